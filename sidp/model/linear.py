"""Matrix products for the decoder, fast for the model's dtype on the CPU at hand.

On a CPU without bfloat16 (or float16) instructions, PyTorch multiplies those dtypes several times
slower than float32 (measured here: ~60 against ~280 GFLOP/s on AVX-512 without AVX512-BF16/AMX).
There, a product with enough rows converts the weight to float32 chunk by chunk in a reusable
scratch buffer and multiplies in float32: the weights stay stored in the model dtype (the memory
ledger holds), and the rounding is that of a bf16 GEMM with a float32 accumulator. Small products
stay native, where the conversion would cost more than it saves.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

MIN_ROWS_TO_UPCAST = 16
SCRATCH_ELEMENTS = 4 * 2**20  # 16 MiB of float32: one chunk of weight rows at a time


def native_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` in hardware (AVX512-BF16 / AMX); float32 always is."""
    if dtype == torch.float32:
        return True
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    else:
        checks = ("_is_amx_fp16_supported",)
    # If this torch lacks the probes, trust it to pick its own kernels.
    return any(getattr(cpu, name, lambda: True)() for name in checks)


def scratch_bytes(dtype: torch.dtype) -> int:
    """What the upcast path keeps per thread, for the memory ledger."""
    return 0 if native_matmul(dtype) else SCRATCH_ELEMENTS * 4


class Matmul:
    """linear(x, weight, bias): F.linear semantics; upcasts through scratch where that is faster."""

    def __init__(self, dtype: torch.dtype):
        self.upcast = not native_matmul(dtype)
        self._local = threading.local()  # one scratch per thread: later, weight services run beside steps

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not self.upcast or rows < MIN_ROWS_TO_UPCAST:
            return F.linear(x, weight, bias)
        out_features, in_features = weight.shape
        chunk = max(1, min(out_features, SCRATCH_ELEMENTS // in_features))
        scratch = self._scratch()
        xf = x.float()
        parts = []
        for start in range(0, out_features, chunk):
            n = min(chunk, out_features - start)
            w = scratch[: n * in_features].view(n, in_features).copy_(weight[start : start + n])
            parts.append(F.linear(xf, w, None if bias is None else bias[start : start + n].float()))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out.to(x.dtype)

    def _scratch(self) -> torch.Tensor:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = torch.empty(SCRATCH_ELEMENTS, dtype=torch.float32)
        return scratch
