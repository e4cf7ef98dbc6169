"""Placement: which replica owns each layer's pooled part (exactly one owner per layer)."""

from __future__ import annotations

from dataclasses import dataclass

from sidp.errors import SidpError

POLICIES = ("round_robin", "contiguous")


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

    def owned_by(self, rank: int) -> list[int]:
        return [layer for layer, owner in enumerate(self.owners) if owner == rank]

    def remote_for(self, rank: int) -> list[int]:
        return [layer for layer, owner in enumerate(self.owners) if owner != rank]
