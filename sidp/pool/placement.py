"""Placement: which replica owns each layer's pooled part (exactly one owner per layer), and which one
owns the embedding / LM head when those are pooled too."""

from __future__ import annotations

from dataclasses import dataclass

from sidp.errors import SidpError
from sidp.memory import PoolShare
from sidp.pool.modes import copies_weights, sends_activations

POLICIES = ("round_robin", "contiguous")
PARTS = ("mlp", "attn", "embed")  # what can be pooled: MLPs, attention projections, embedding / LM head


@dataclass(frozen=True, slots=True)
class Placement:
    owners: tuple[int, ...]  # owners[layer] = rank
    size: int

    @classmethod
    def build(cls, num_layers: int, size: int, policy: str = "round_robin") -> Placement:
        if policy == "round_robin":
            owners = tuple(layer % size for layer in range(num_layers))
        elif policy == "contiguous":
            # The first num_layers % size ranks take one layer more, so blocks differ by at most one.
            base, extra = divmod(num_layers, size)
            owners = tuple(rank for rank in range(size) for _ in range(base + (rank < extra)))
        else:
            raise SidpError(f"Unknown placement {policy!r}; use one of {', '.join(POLICIES)}.")
        return cls(owners, size)

    @property
    def embed_owner(self) -> int:
        """The last of the ranks owning fewest layers: the embedding evens the load where it can."""
        return min(range(self.size), key=lambda rank: (len(self.owned_by(rank)), -rank))

    def owned_by(self, rank: int) -> list[int]:
        return [layer for layer, owner in enumerate(self.owners) if owner == rank]

    def remote_for(self, rank: int) -> list[int]:
        return [layer for layer, owner in enumerate(self.owners) if owner != rank]


def parse_parts(text: str) -> frozenset[str]:
    """ "mlp", "mlp,attn", "mlp,attn,embed", ...: the pooled parts, checked."""
    parts = frozenset(p.strip() for p in text.split(",") if p.strip())
    if not parts or not parts <= set(PARTS):
        raise SidpError(f"pooled_parts={text!r}: give a comma-separated choice of {', '.join(PARTS)}.")
    return parts


def pool_share(
    placement: Placement, rank: int, parts: frozenset[str], mode: str, cache_slots: int
) -> PoolShare:
    """What `rank` holds of the pool in `mode`, for its memory ledger."""
    layer_parts = parts - {"embed"}
    borrows = bool(layer_parts and placement.remote_for(rank))
    return PoolShare(
        parts=parts,
        owned_layers=len(placement.owned_by(rank)),
        holds_embedding=placement.embed_owner == rank,
        cache_slots=cache_slots if borrows and copies_weights(mode) else 0,
        cas_peers=placement.size - 1 if layer_parts and sends_activations(mode) else 0,
    )
