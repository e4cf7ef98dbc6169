"""EngineConfig: the resolved settings one replica runs with (all defaults filled, all limits checked)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sidp.errors import SidpError
from sidp.pool.modes import sends_activations
from sidp.pool.placement import Placement

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, config: dict) -> torch.dtype:
    """vLLM's rule: "auto" takes the checkpoint's dtype, except float32 which runs in bfloat16 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored = config.get("torch_dtype") or config.get("dtype") or "float32"
        resolved = _DTYPES.get(str(stored).removeprefix("torch."), torch.float32)
        return torch.bfloat16 if resolved == torch.float32 else resolved
    if dtype not in _DTYPES:
        raise SidpError(f"Unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16.")
    return _DTYPES[dtype]


@dataclass(slots=True)
class EngineConfig:
    model: Path
    dtype: torch.dtype
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    memory_per_replica: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    placement: Placement | None = None  # None: every replica holds every layer (plain DP)
    pooled_parts: frozenset[str] = frozenset({"mlp"})
    sidp_mode: str = "map"
    cache_slots: int = 2
    mode_probe_every: int = 0  # > 0: every k-th step is also timed in both modes (benchmarks)
    device: str = "cpu"  # where weights, KV cache and activations live: "cpu" or "cuda"

    @property
    def uses_cas(self) -> bool:
        return self.placement is not None and sends_activations(self.sidp_mode)
