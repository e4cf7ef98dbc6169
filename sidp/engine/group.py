"""The driver's side of a data-parallel group: spawn replicas, hand out requests, gather results.

Requests go into one shared queue that replicas pull from as they have room (offline load
balancing); results come back in completion order and the caller restores input order. A replica
that dies or fails stops the whole group within a second, with an error that names it.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from sidp.config import EngineConfig
from sidp.engine.llm_engine import FinishedRequest
from sidp.engine.replica import STOP, replica_main
from sidp.errors import SidpError
from sidp.memory import MemoryPlan
from sidp.model.spec import ModelSpec
from sidp.pool.transport import transport_for
from sidp.sampling_params import SamplingParams

POLL_S = 0.5
JOIN_S = 5.0


class ReplicaGroup:
    def __init__(self, config: EngineConfig, spec: ModelSpec, plans: list[MemoryPlan]):
        # spawn, not fork: fork would copy the driver's threads and torch state. torch's context sends
        # shared tensors as file descriptors, so a pool segment dies with its last holder.
        ctx = mp.get_context("spawn")
        size = len(plans)
        self.counters: dict[int, dict] = {}  # replica -> its latest cumulative figures
        self.requests = ctx.Queue()
        self.results = ctx.Queue()
        self.controls = controls = [ctx.Queue() for _ in range(size)]
        threads = max(1, torch.get_num_threads() // size)
        channels = _cas_channels(ctx, size, config.uses_cas)
        self.procs = [
            ctx.Process(
                target=replica_main,
                name=f"sidp-replica-{rank}",
                daemon=True,
                args=(
                    rank,
                    config,
                    spec,
                    plans[rank],
                    threads,
                    self.requests,
                    self.results,
                    controls[rank],
                    channels[rank],
                ),
            )
            for rank in range(size)
        ]
        for proc in self.procs:
            proc.start()
        for clients, servers in channels.values():  # the replicas hold their ends now
            for end in (*clients.values(), *servers.values()):
                end.close()
        if config.placement is not None:
            pool: dict = {"layers": {}, "whole": {}, "buffers": {}}
            for _ in range(size):
                for key, handles in self._expect("owned").items():
                    pool[key].update(handles)
            for control in controls:
                control.put(pool)
        for _ in range(size):
            self._expect("ready")

    def _expect(self, kind: str):
        """The next message, which must be of `kind`."""
        got, payload = self._next()
        if got != kind:
            self.close(at_once=True)
            raise RuntimeError(f"replica sent {got!r} where the driver expected {kind!r}")
        return payload

    def run(
        self, requests: list[tuple[list[int], SamplingParams]], on_finish: Callable[[FinishedRequest], None]
    ) -> list[FinishedRequest]:
        if not self.procs:
            raise SidpError("This LLM's replicas have stopped after an earlier error; create a new LLM.")
        try:
            for seq_id, (token_ids, params) in enumerate(requests):
                self.requests.put((seq_id, token_ids, params))
            finished: list[FinishedRequest | None] = [None] * len(requests)
            for _ in requests:
                _, (done, counters) = self._next()
                self.counters[counters["replica"]] = counters
                finished[done.seq_id] = done
                on_finish(done)
            return finished
        except BaseException:
            self.close(at_once=True)  # requests handed out cannot be recalled: stop the group
            raise

    def _next(self) -> tuple[str, object]:
        while True:
            try:
                kind, payload = self.results.get(timeout=POLL_S)
            except queue.Empty:
                self._check_alive()
                continue
            if kind == "error":
                rank, trace = payload
                # A peer's death is the cause worth naming, not its echo here; give the kernel a
                # moment to finish reaping a replica whose sockets it has already closed.
                for _ in range(5):
                    self._check_alive()
                    time.sleep(0.05)
                self.close(at_once=True)
                raise SidpError(f"Replica {rank} failed: {trace.strip().splitlines()[-1]}")
            return kind, payload

    def _check_alive(self) -> None:
        # Only numbers stay in this frame: a Process kept alive by the traceback would keep the queues
        # (its arguments), and their semaphores in /dev/shm, alive with it.
        dead = next(((rank, p.exitcode) for rank, p in enumerate(self.procs) if not p.is_alive()), None)
        if dead is not None:
            self.close(at_once=True)
            raise SidpError(
                f"Replica {dead[0]} died (exit code {dead[1]}); its requests are lost. "
                "If the system killed it for memory, lower memory_per_replica."
            )

    def close(self, at_once: bool = False) -> None:
        """Stop the replicas: politely when idle, at once after an error (they may hold requests)."""
        if self.requests is None:
            return
        procs, self.procs = self.procs, []
        if at_once:
            self.requests.cancel_join_thread()  # undelivered requests must not keep the driver alive
        for proc in procs:
            if at_once:
                proc.terminate()
            else:
                self.requests.put(STOP)
        for proc in procs:
            proc.join(JOIN_S)
            if proc.is_alive():
                proc.kill()
                proc.join(JOIN_S)
        # Dropping the queues unlinks their named semaphores from /dev/shm now, not at interpreter exit.
        for q in (self.requests, self.results, *self.controls):
            q.close()
        self.requests = self.results = None
        self.controls = []


def _cas_channels(ctx, size: int, wanted: bool) -> dict[int, tuple[dict, dict]]:
    """rank -> (owner -> requester end, requester -> owner end): one socket pair per ordered pair."""
    transport = transport_for("cpu")
    channels = {rank: ({}, {}) for rank in range(size)}
    for requester in range(size if wanted else 0):
        for owner in range(size):
            if requester != owner:
                channels[requester][0][owner], channels[owner][1][requester] = transport.channel(ctx)
    return channels
