"""The weight provider: each layer's feed-forward, as owned (shared with the group) or borrowed (WaS).

A replica loads only the pooled parts it owns, into memory its peers can map; after the group has
exchanged handles, every layer's MLP becomes a callable the decoder uses without knowing which kind.
"""

from __future__ import annotations

import torch

from sidp.model.checkpoint import Checkpoint
from sidp.model.decoder import Mlp, read_mlp, swiglu
from sidp.pool.placement import Placement
from sidp.pool.weight_cache import WeightCache, Weights


def load_owned(checkpoint: Checkpoint, layers: list[int], dtype: torch.dtype) -> dict[int, Weights]:
    """The owned layers' (gate_up, down), read from disk straight into shareable memory."""
    owned = {}
    for layer in layers:
        owned[layer] = tuple(t.share_memory_() for t in read_mlp(lambda n: checkpoint.read(n, dtype), layer))
    return owned


class BorrowedMlp:
    """A remote layer's feed-forward on the copy the weight cache prefetched."""

    def __init__(self, layer: int, cache: WeightCache):
        self.layer = layer
        self.cache = cache

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.cache.acquire(self.layer)
        try:
            return swiglu(x, gate_up, down)
        finally:
            self.cache.release()


def pooled_mlps(
    placement: Placement, rank: int, weights: dict[int, Weights], slots: int
) -> tuple[list, WeightCache | None]:
    """One feed-forward callable per layer for `rank`, and the weight cache serving its remote layers."""
    remote = placement.remote_for(rank)
    cache = WeightCache(remote, weights, slots) if remote else None
    mlps = [
        BorrowedMlp(layer, cache) if placement.owners[layer] != rank else Mlp(*weights[layer])
        for layer in range(len(placement.owners))
    ]
    return mlps, cache
