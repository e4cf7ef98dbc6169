"""A replica process: its own engine, pulling requests from the driver's queue whenever it has room.

Replicas never wait for each other: each admits a new request only once its scheduler has placed
every request it holds, so a replica that is short of KV room leaves the rest of the queue to the
others. Finished requests go straight back to the driver. A replica exits on the driver's stop
message, or by itself when the driver has gone.
"""

from __future__ import annotations

import os
import queue
import signal
import traceback

import torch

from sidp.config import EngineConfig
from sidp.engine.llm_engine import LLMEngine
from sidp.memory import MemoryPlan
from sidp.model.checkpoint import open_checkpoint
from sidp.model.spec import ModelSpec
from sidp.pool.cas import new_buffer
from sidp.pool.member import PoolMember
from sidp.pool.provider import load_owned
from sidp.pool.transport import transport_for

STOP = None
IDLE_POLL_S = 1.0  # how often an idle replica checks that its driver is still alive


def replica_main(
    rank: int,
    config: EngineConfig,
    spec: ModelSpec,
    plan: MemoryPlan,
    threads: int,
    requests,
    results,
    control,
    channels: tuple[dict, dict],
) -> None:
    """channels: (owner -> my requester end, requester -> my owner end) of the CaS socket pairs."""
    # Ctrl-C belongs to the driver, which stops the group; a replica dying on it would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    driver = os.getppid()
    try:
        pool = _join_pool(rank, config, spec, results, control, channels)
        engine = LLMEngine(config, spec, plan, pool)
        results.put(("ready", rank))
        while True:
            if not _pull(engine, requests, driver):
                return
            if engine.has_work():
                for done in engine.step():
                    results.put(("done", (done, _counters(rank, engine, pool))))
    except Exception:
        results.put(("error", (rank, traceback.format_exc())))


def _join_pool(
    rank: int, config: EngineConfig, spec: ModelSpec, results, control, channels
) -> PoolMember | None:
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
    results.put(("owned", {"layers": layers, "whole": whole, "buffers": buffers}))
    group = control.get()
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
    counters = {"replica": rank, "steps": engine.num_steps, "preemptions": engine.scheduler.num_preemptions}
    if pool is not None:
        counters.update(pool.counters())
    return counters


def _pull(engine: LLMEngine, requests, driver: int) -> bool:
    """Take requests while the scheduler has room for them; False when the replica should exit."""
    while engine.wants_requests():
        try:
            message = requests.get(block=not engine.has_work(), timeout=IDLE_POLL_S)
        except queue.Empty:
            if engine.has_work():
                return True
            if os.getppid() != driver:
                return False
            continue
        if message is STOP:
            return False
        seq_id, token_ids, params = message
        engine.add_request(seq_id, token_ids, params)
    return True
