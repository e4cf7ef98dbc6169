"""The driver's side of a data-parallel group: spawn replicas, hand out requests, gather results.

Replicas ask for requests as they have room (offline load balancing); results come back in completion
order and the caller restores input order. The driver waits on each replica's pipe and on its process
sentinel at once, so a replica that dies or fails stops the whole group at once, with an error that
names it. Every way the group can end (close, an error, Ctrl-C, the LLM going out of scope, the
interpreter exiting) stops every replica; and a replica dies with its driver (sidp.engine.lifeline).
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection as mpc
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from sidp.config import EngineConfig
from sidp.engine.llm_engine import FinishedRequest
from sidp.engine.replica import EMPTY, STOP, WAKE, replica_main
from sidp.errors import SidpError
from sidp.memory import MemoryPlan
from sidp.model.spec import ModelSpec
from sidp.pool import handoff
from sidp.pool.transport import transport_for
from sidp.sampling_params import SamplingParams

POLL_S = 0.5
JOIN_S = 5.0


class ReplicaGroup:
    def __init__(self, config: EngineConfig, spec: ModelSpec, plans: list[MemoryPlan]):
        self.counters: dict[int, dict] = {}  # replica -> its latest cumulative figures
        self.procs: list = []
        self.conns: list[mpc.Connection] = []
        self.hungry: set[int] = set()  # replicas told "empty": woken when requests come
        self._turn = 0  # which replica's message is read first next time: each gets its turn
        self._finalizer = weakref.finalize(self, _shut_down, self.procs, self.conns, False)
        try:
            self._start(config, spec, plans)
        except BaseException as error:
            self.close(at_once=True)
            if isinstance(error, KeyboardInterrupt):
                raise KeyboardInterrupt("interrupted while the replicas started; all are stopped") from None
            raise

    def _start(self, config: EngineConfig, spec: ModelSpec, plans: list[MemoryPlan]) -> None:
        # spawn, not fork: fork would copy the driver's threads and torch state.
        ctx = mp.get_context("spawn")
        size = len(plans)
        threads = max(1, torch.get_num_threads() // size)
        channels = _cas_channels(ctx, size, config.uses_cas)
        main_thread = threading.current_thread() is threading.main_thread()
        ends = []
        for rank in range(size):
            mine, theirs = ctx.Pipe()
            ends.append(theirs)
            args = (rank, os.getpid(), main_thread, config, spec, plans[rank], threads, theirs)
            args += (channels[rank],)
            # daemon: should the interpreter's own exit hook come before ours, it stops them too
            proc = ctx.Process(target=replica_main, name=f"sidp-replica-{rank}", args=args, daemon=True)
            try:
                proc.start()
            except BaseException:
                mine.close()
                raise
            self.procs.append(proc)
            self.conns.append(mine)  # only beside a started process: shutting down pairs them
        self._watched = [*self.conns, *(proc.sentinel for proc in self.procs)]  # what _next waits on
        for end in ends:  # the replicas hold their ends now: a dead replica's pipe reads as closed
            end.close()
        for clients, servers in channels.values():
            for end in (*clients.values(), *servers.values()):
                end.close()
        if config.placement is not None:
            self._exchange_handles(size)
        for _ in range(size):
            self._expect("ready")
        self.hungry = set(range(size))  # a replica asks for requests once woken

    def _exchange_handles(self, size: int) -> None:
        """Pass every replica's exported tensors (by descriptor, unopened here) on to all replicas."""
        pool: dict = {"layers": {}, "whole": {}, "buffers": {}}
        fds: list[int] = []
        try:
            for _ in range(size):
                rank = self._expect("owned")
                try:
                    handles, theirs = handoff.receive_handles(self.conns[rank])
                except (EOFError, OSError):  # it died between the two messages: say so, as _next does
                    self.procs[rank].join(1.0)
                    self._check_alive()
                    raise
                fds += theirs
                for key, part in handles.items():
                    pool[key].update(part)
            for conn in self.conns:
                conn.send(("pool", None))
                handoff.send(conn, pool)
        finally:
            handoff.close(fds)

    def _expect(self, kind: str) -> int:
        """The rank that sent the next message, which must be of `kind`."""
        rank, got, _ = self._next()
        if got != kind:
            raise RuntimeError(f"replica {rank} sent {got!r} where the driver expected {kind!r}")
        return rank

    def run(
        self, requests: list[tuple[list[int], SamplingParams]], on_finish: Callable[[FinishedRequest], None]
    ) -> list[FinishedRequest]:
        if not self.procs:
            raise SidpError("This LLM's replicas have stopped (closed, or after an error); create a new LLM.")
        todo = deque(enumerate(requests))
        finished: list[FinishedRequest | None] = [None] * len(requests)
        try:
            for rank in self.hungry:
                self.conns[rank].send(WAKE)
            self.hungry.clear()
            left = len(requests)
            while left:
                rank, kind, payload = self._next()
                if kind == "pull" and todo:
                    seq_id, (token_ids, params) = todo.popleft()
                    self.conns[rank].send(("request", (seq_id, token_ids, params)))
                elif kind == "pull":
                    self.conns[rank].send(EMPTY)
                    self.hungry.add(rank)
                elif kind == "done":
                    done, counters = payload
                    self.counters[rank] = counters
                    finished[done.seq_id] = done
                    left -= 1
                    on_finish(done)
                else:
                    raise RuntimeError(f"replica {rank} sent {kind!r} in the middle of a run")
            return finished
        except BaseException:
            self.close(at_once=True)  # requests handed out cannot be recalled: stop the group
            raise

    def _next(self) -> tuple[int, str, object]:
        """(rank, kind, payload) of the next message from any replica; raises if one failed or died."""
        while True:
            ready = mpc.wait(self._watched, timeout=POLL_S)
            size = len(self.conns)
            for rank in (r % size for r in range(self._turn, self._turn + size)):
                if self.conns[rank] not in ready:
                    continue
                try:
                    kind, payload = self.conns[rank].recv()
                except (EOFError, OSError):  # it died: its sentinel says how, below
                    self.procs[rank].join(1.0)
                    break
                if kind == "error":
                    self._fail_for(rank, payload)
                self._turn = rank + 1
                return rank, kind, payload
            self._check_alive()

    def _fail_for(self, rank: int, trace: str) -> None:
        # A peer's death is the cause worth naming, not its echo here; give the kernel a moment to
        # finish reaping a replica whose sockets it has already closed.
        for _ in range(5):
            self._check_alive()
            time.sleep(0.05)
        raise SidpError(f"Replica {rank} failed: {trace.strip().splitlines()[-1]}")

    def _check_alive(self) -> None:
        dead = next(((rank, p.exitcode) for rank, p in enumerate(self.procs) if not p.is_alive()), None)
        if dead is not None:
            raise SidpError(
                f"Replica {dead[0]} died (exit code {dead[1]}); its requests are lost. "
                "If the system killed it for memory, lower memory_per_replica."
            )

    def close(self, at_once: bool = False) -> None:
        """Stop the replicas: politely (they finish their step) or, after an error or an interrupt, at
        once (they may hold requests that nobody will collect)."""
        if self._finalizer.detach() is not None:
            _shut_down(self.procs, self.conns, at_once)


def _shut_down(procs: list, conns: list, at_once: bool) -> None:
    """Stop every replica within JOIN_S, killing any that lingers; also what runs when the group is
    garbage-collected or the interpreter exits (so it holds no reference to the group itself)."""
    try:
        for proc, conn in zip(procs, conns, strict=True):
            if at_once:
                proc.kill()  # nothing in a replica needs cleaning up: the kernel frees all it holds
            else:
                with contextlib.suppress(OSError):
                    conn.send(STOP)
        deadline = time.monotonic() + JOIN_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
    finally:  # a second Ctrl-C while waiting lands here too: kill at once
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(JOIN_S)
        for conn in conns:
            conn.close()
        procs.clear()
        conns.clear()


def _cas_channels(ctx, size: int, wanted: bool) -> dict[int, tuple[dict, dict]]:
    """rank -> (owner -> requester end, requester -> owner end): one socket pair per ordered pair."""
    transport = transport_for("cpu")
    channels = {rank: ({}, {}) for rank in range(size)}
    for requester in range(size if wanted else 0):
        for owner in range(size):
            if requester != owner:
                channels[requester][0][owner], channels[owner][1][requester] = transport.channel(ctx)
    return channels
