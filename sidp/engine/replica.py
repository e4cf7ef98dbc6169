"""A replica process: its own engine, asking the driver for a request whenever it has room.

Replicas never wait for each other: each asks for another request only while what it holds would not fill
its next step's token budget, and never while a request waits for KV room, so a replica holds at most a
step's worth beyond what it runs and one short of KV room leaves the rest to the others. (Asking only once
every held request was placed started one prompt per step.) The driver answers each ask with a request
or "empty", and sends "wake" to a replica it told "empty" once it has requests again. Finished requests go
straight back. One duplex pipe per replica carries all of it: a socket pair, which the kernel closes with
either end's process, so neither side ever waits on one that has gone.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import traceback

import torch

from sidp.config import EngineConfig
from sidp.engine.lifeline import tie_to_driver
from sidp.engine.llm_engine import LLMEngine
from sidp.memory import MemoryPlan
from sidp.model.checkpoint import open_checkpoint
from sidp.model.spec import ModelSpec
from sidp.pool import handoff
from sidp.pool.cas import new_buffer
from sidp.pool.member import PoolMember
from sidp.pool.provider import load_owned
from sidp.pool.transport import transport_for

PULL, EMPTY, WAKE, STOP = ("pull", None), ("empty", None), ("wake", None), ("stop", None)
POLL_S = 0.5  # how often a waiting replica looks at its own pool threads


class _Stopped(Exception):
    """The driver said stop, or has gone."""


def replica_main(
    rank: int,
    driver_pid: int,
    kernel_signal: bool,
    config: EngineConfig,
    spec: ModelSpec,
    plan: MemoryPlan,
    threads: int,
    conn,
    channels: tuple[dict, dict],
) -> None:
    """conn: this replica's end of its pipe to the driver; channels: (owner -> my requester end,
    requester -> my owner end) of the CaS socket pairs."""
    # Ctrl-C in a terminal reaches the whole process group; the driver alone decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tie_to_driver(driver_pid, f"sidp-replica-{rank}", kernel_signal)
    torch.set_num_threads(threads)
    if config.device == "cuda":  # one GPU each while there are enough; several share one otherwise
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        pool = _join_pool(rank, config, spec, conn, channels)
        engine = LLMEngine(config, spec, plan, pool)
        conn.send(("ready", rank))
        _serve(rank, engine, pool, conn)
    except _Stopped:
        return
    except Exception:
        with contextlib.suppress(OSError):  # a driver that has gone needs no report
            conn.send(("error", traceback.format_exc()))
    finally:
        # The process exits next. Without the collector's last passes over torch's objects (0.5 s) the
        # driver's join returns sooner; the kernel frees what a replica holds (memfd segments, sockets).
        gc.freeze()


def _serve(rank: int, engine: LLMEngine, pool: PoolMember | None, conn) -> None:
    starved = True  # the driver has nothing for us (yet); it sends "wake" when it has
    while True:
        while not starved and engine.wants_requests():  # fill up before stepping
            conn.send(PULL)
            kind, payload = _receive(conn, pool, block=True)
            if kind == "request":
                engine.add_request(*payload)
            else:
                starved = kind == "empty"
        if starved and _receive(conn, pool, block=not engine.has_work()) is not None:
            starved = False  # "wake": the only message the driver sends unasked
        if engine.has_work():
            for done in engine.step():
                conn.send(("done", (done, _counters(rank, engine, pool))))
        if pool is not None:
            pool.check()


def _receive(conn, pool: PoolMember | None, block: bool):
    """The driver's next message; None if there is none and block is False."""
    while not conn.poll(POLL_S if block else 0):
        if not block:
            return None
        if pool is not None:
            pool.check()  # a pool thread that died is an error even while this replica waits
    try:
        message = conn.recv()
    except (EOFError, OSError):
        raise _Stopped from None
    if message == STOP:
        raise _Stopped
    return message


def _join_pool(rank: int, config: EngineConfig, spec: ModelSpec, conn, channels) -> PoolMember | None:
    """Load and export what this replica owns, receive everyone's handles, and become a pool member."""
    if config.placement is None:
        return None
    transport = transport_for("cpu")
    layers, whole = load_owned(
        open_checkpoint(config.model),
        spec,
        config.placement,
        rank,
        config.pooled_parts,
        config.dtype,
        transport,
    )
    clients, servers = channels
    buffers = {(rank, owner): transport.export(new_buffer(spec, config.dtype)) for owner in clients}
    conn.send(("owned", None))  # what this replica exports follows, its descriptors with it
    handoff.send(conn, {"layers": layers, "whole": whole, "buffers": buffers})
    _receive(conn, None, block=True)  # ("pool", None): everyone's, likewise
    group = handoff.receive(conn)
    return PoolMember(
        spec,
        config.dtype,
        config.placement,
        rank,
        config.pooled_parts,
        config.sidp_mode,
        group["layers"],
        group["whole"],
        transport,
        config.cache_slots,
        clients={owner: (end, buffers[rank, owner]) for owner, end in clients.items()},
        servers=[(end, group["buffers"][requester, rank]) for requester, end in servers.items()],
        max_rows=config.max_num_batched_tokens,
        probe_every=config.mode_probe_every,
    )


def _counters(rank: int, engine: LLMEngine, pool: PoolMember | None) -> dict:
    """Cumulative figures sent with each result, so the driver's latest copy is current when a call ends."""
    counters = engine.counters(rank)
    if pool is not None:
        counters.update(pool.counters())
    return counters
