"""The ways a replica borrows a layer it does not own, and what each needs set up beside the engine."""

from __future__ import annotations

MODES = ("auto", "was", "cas", "map")  # auto: WaS or CaS, chosen per step


def copies_weights(mode: str) -> bool:
    """Whether the mode keeps WaS cache slots and a prefetcher."""
    return mode in ("was", "auto")


def sends_activations(mode: str) -> bool:
    """Whether the mode needs CaS channels, buffers and services."""
    return mode in ("cas", "auto")


def default_mode(transport) -> str:
    """In place where a peer's memory computes at local speed: that costs the compute alone, which no
    copy (WaS) or round trip (CaS) can undercut, and needs neither slots nor buffers. Elsewhere auto."""
    return "map" if transport.maps_peers else "auto"
