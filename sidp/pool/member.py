"""A replica's membership in the pool: the WeightPool its decoder asks (see sidp.model.decoder).

Owned layers run on the owner's own shared tensors. A remote layer runs, step by step, in the mode
the step was given: WaS on the weight cache's slot, CaS on its owner's service, or, where the
transport maps a peer's memory at local speed (CPU shared memory), "map": straight on the owner's
pages, nothing copied or sent. "was", "cas" and "map" fix the mode; "auto" asks the policy (WaS or
CaS) for every step. `probe_every` > 0 also runs every k-th step in both modes, alternately, and
records the best time of each, to check the policy against measured reality.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from sidp.model.decoder import Weights, ops_of, project
from sidp.model.linear import compute_dtype
from sidp.pool.cas import CasClient, CasServer
from sidp.pool.modes import copies_weights
from sidp.pool.placement import Placement
from sidp.pool.policy import ModePolicy, calibrate
from sidp.pool.weight_cache import WeightCache

MAX_PROBES = 400  # probe samples kept per replica
PROBE_REPEATS = 2  # runs of each mode per probed step: the best of them is its time


class PoolMember:
    def __init__(
        self,
        spec,
        dtype: torch.dtype,
        placement: Placement,
        rank: int,
        parts: frozenset[str],
        mode: str,
        layers: dict[int, Weights],
        whole: Weights,
        transport,
        cache_slots: int,
        clients: dict[int, tuple] | None = None,
        servers: list[tuple] | None = None,
        max_rows: int = 2048,
        probe_every: int = 0,
    ):
        """layers/whole: every replica's exported tensors; clients: owner -> (channel end, buffer) for
        the CaS requests this replica sends; servers: (channel end, buffer) of each requester it serves."""
        self.parts = parts
        if mode == "map" and not transport.maps_peers:
            raise ValueError("sidp_mode='map' needs a transport whose peer views are local memory")
        self.mode = "was" if mode == "auto" else mode
        self.auto = mode == "auto"
        self.ops = ops_of(parts)
        self.owned = {layer: layers[layer] for layer in placement.owned_by(rank)}
        remote = placement.remote_for(rank) if self.ops else []
        self.peers = peers = {
            layer: {n: transport.open(t) for n, t in layers[layer].items()} for layer in remote
        }
        self.whole = {name: transport.open(t) for name, t in whole.items()}
        self.server = CasServer(spec, self.owned, servers) if servers and self.owned else None
        self.client = CasClient(spec, placement.owners, clients) if clients and remote else None
        self.policy = None
        if self.auto and remote:
            some_owner = placement.owners[remote[0]]
            calibration = calibrate(
                spec,
                compute_dtype(dtype),
                peers[remote[0]],
                self.ops,
                max_rows,
                transport.copy_into,
                lambda: self.client.ping(some_owner),
            )
            self.policy = ModePolicy(calibration, len(remote), len(self.ops), cache_slots)
        use_was = copies_weights(mode) and remote
        self.cache = WeightCache(remote, peers, cache_slots, transport.copy_into) if use_was else None
        self.remote = set(remote)
        self.steps = {"was": 0, "cas": 0, "map": 0}
        self.probe_every = probe_every if self.cache and self.client else 0
        self.probes: list[dict] = []

    # --- the WeightPool a decoder asks ------------------------------------------------------------

    def layer(self, index: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
        if index in self.remote:
            return _RemoteLayer(self, index)
        return lambda op, x: project(op, x, self.owned[index])

    def tensor(self, name: str) -> torch.Tensor:
        return self.whole[name]

    def step(self, num_tokens: int, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        mode = self.policy.choose(num_tokens) if self.policy else self.mode
        self.steps[mode] += 1
        sample = self.probe_every and (sum(self.steps.values()) - 1) % self.probe_every == 0
        if sample and len(self.probes) < MAX_PROBES:
            # Alternating, the best of PROBE_REPEATS runs each, the chosen mode last so the KV it
            # writes is the step's own (every run writes the same K/V to the same slots).
            other = "cas" if mode == "was" else "was"
            times = {other: float("inf"), mode: float("inf")}
            for run_mode in (other, mode) * PROBE_REPEATS:
                hidden, elapsed = self._timed(run_mode, num_tokens, forward)
                times[run_mode] = min(times[run_mode], elapsed)
            self.probes.append(
                {"tokens": num_tokens, "chosen": mode, **{f"{m}_s": t for m, t in times.items()}}
            )
            return hidden
        return self._timed(mode, num_tokens, forward)[0]

    def _timed(self, mode: str, num_tokens: int, forward) -> tuple[torch.Tensor, float]:
        self.mode = mode
        cas_waited = self.client.wait_s if self.client else 0.0
        started = time.perf_counter()
        hidden = forward()
        elapsed = time.perf_counter() - started
        if self.policy and mode == "cas":
            self.policy.observe_cas(num_tokens, self.client.wait_s - cas_waited)
        elif self.policy:
            self.policy.observe_copy(self.cache.last_copy_s)
        return hidden, elapsed

    def check(self) -> None:
        """Raise if a thread this replica runs for the pool (CaS service, WaS prefetch) has stopped."""
        if self.server is not None:
            self.server.check()
        if self.cache is not None:
            self.cache.check()

    # --- figures -----------------------------------------------------------------------------------

    def counters(self) -> dict:
        counters = {f"steps_{mode}": n for mode, n in self.steps.items()}
        if self.cache:
            counters.update(
                was_bytes_fetched=self.cache.bytes_fetched, was_wait_s=round(self.cache.wait_s, 3)
            )
        if self.client:
            counters.update(cas_sent=self.client.sent, cas_wait_s=round(self.client.wait_s, 3))
        if self.server:
            counters.update(cas_served=self.server.served, cas_fused=self.server.fused)
        if self.policy:
            c = self.policy.calibration
            counters.update(
                calibrated_copy_ms=round(c.copy_s * 1e3, 3),
                calibrated_round_trip_ms=round(c.round_trip_s * 1e3, 3),
            )
        if self.probes:
            counters["probes"] = list(self.probes)
        return counters


class _RemoteLayer:
    """A layer owned elsewhere: its pooled ops on the weight cache's slot (WaS) or on the owner (CaS)."""

    def __init__(self, member: PoolMember, layer: int):
        self.member = member
        self.layer = layer
        self.first, self.last = member.ops[0], member.ops[-1]
        self.weights: Weights | None = None

    def __call__(self, op: str, x: torch.Tensor) -> torch.Tensor:
        member = self.member
        if member.mode == "cas":
            return member.client(self.layer, op, x)
        if member.mode == "map":
            return project(op, x, member.peers[self.layer])
        if op == self.first:
            self.weights = member.cache.acquire(self.layer)
        out = project(op, x, self.weights)
        if op == self.last:
            self.weights = None
            member.cache.release()
        return out
