"""What a vLLM rank process is told about its SiDP group, from its environment (so vLLM's engine and
worker processes, which inherit it, read the same). SIDP_VLLM_GROUP switches the plugin on; without it
the plugin does nothing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from sidp.errors import SidpError

GROUP = "SIDP_VLLM_GROUP"  # any name shared by the ranks of one run, and by no other run at the same time
RANK = "SIDP_VLLM_RANK"
SIZE = "SIDP_VLLM_SIZE"
PARTS = "SIDP_VLLM_POOLED_PARTS"  # "mlp" (default), "attn" or "mlp,attn"
PLACEMENT = "SIDP_VLLM_PLACEMENT"  # "round_robin" (default) or "contiguous"
TIMEOUT = "SIDP_VLLM_TIMEOUT"  # seconds a rank waits for its peers at start-up (default 600)

LAYER_PARTS = ("mlp", "attn")  # the plugin pools parts of the decoder layers, not the embedding


@dataclass(frozen=True, slots=True)
class Settings:
    group: str
    rank: int
    size: int
    parts: frozenset[str] = frozenset({"mlp"})
    placement: str = "round_robin"
    timeout_s: float = 600.0


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get(GROUP))


def from_env(environ: Mapping[str, str] = os.environ) -> Settings:
    """The settings of an enabled run, checked; a SidpError that names the variable to fix."""
    rank, size = _integer(environ, RANK), _integer(environ, SIZE)
    if size < 1 or not 0 <= rank < size:
        raise SidpError(
            f"{RANK}={rank} and {SIZE}={size}: give a group size of at least 1 and a rank below it."
        )
    from sidp.pool.placement import POLICIES, parse_parts

    parts = parse_parts(environ.get(PARTS, "mlp"))
    if not parts <= set(LAYER_PARTS):
        raise SidpError(
            f"{PARTS}={environ[PARTS]!r}: inside vLLM sidp pools {' and '.join(LAYER_PARTS)} only."
        )
    placement = environ.get(PLACEMENT, "round_robin")
    if placement not in POLICIES:
        raise SidpError(f"{PLACEMENT}={placement!r}: use one of {', '.join(POLICIES)}.")
    timeout_s = _number(environ, TIMEOUT, 600.0)
    return Settings(environ[GROUP], rank, size, parts, placement, timeout_s)


def _integer(environ: Mapping[str, str], name: str) -> int:
    text = environ.get(name)
    if text is None:
        raise SidpError(f"{GROUP} is set, so {name} must be too: each rank needs {RANK} and {SIZE}.")
    try:
        return int(text)
    except ValueError:
        raise SidpError(f"{name}={text!r} is not a whole number.") from None


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name)
    try:
        value = default if text is None else float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise SidpError(f"{name}={text!r}: give a number of seconds above 0.")
    return value
