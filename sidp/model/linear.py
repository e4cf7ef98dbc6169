"""Matrix products for the decoder, fast for the model's dtype on the CPU at hand.

On a CPU without bfloat16 (or float16) instructions, PyTorch multiplies those dtypes about four
times slower than float32 (measured here: 3.9 against 1.0 ms for 64×576 by 576×3072; AVX-512
without AVX512-BF16 or AMX). There the decoder computes in float32 (`compute_dtype`) while weights
and KV cache stay stored in the model dtype, so the memory ledger holds: `linear` multiplies float32
activations by the 16-bit weight with sidp's own kernel (sidp/csrc/linear_widened.cpp), which widens the
weight panel by panel inside each core's L1 cache and never writes a float32 copy of it (the rounding of
a bf16 GEMM with a float32 accumulator). A single row is cheaper narrowed to bf16 instead. On a CPU path
without that kernel (`native`: not x86), each weight is widened into a reusable per-thread float32
scratch, chunk by chunk, and multiplied by PyTorch.

Where the CPU multiplies bf16 in hardware, weights are packed for oneDNN once (`packed`); so are float32
weights on AMD CPUs, where oneDNN multiplies float32 faster than MKL (`packs`). On AMX, a
product of few rows (a decode step's) then runs on sidp's own tile kernel, which reads oneDNN's packed
bytes in place: no second copy of any weight.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch
import torch.nn.functional as F

from sidp.machine import cpu_vendor
from sidp.model import cpu_kernels

MIN_ROWS_TO_WIDEN = 2  # below this, narrowing the activations beats widening the weight (measured)
SCRATCH_ELEMENTS = 4 * 2**20  # 16 MiB of float32: the largest chunk of weight rows widened at once
L2_CHUNK_ELEMENTS = 2**17  # 512 KiB: the chunk for few rows on one thread
FEW_ROWS = 16
# Up to this many rows, a packed bf16 weight multiplies faster on AMX tiles by sidp's kernel than by
# oneDNN (sidp/csrc/linear_amx.cpp): a step of SmolLM2's 30 layers takes less time from 1 to 128 rows,
# and no less at 256 (benchmarks/matmul_amx.py; docs/BENCHMARKS.md has the figures).
AMX_MAX_ROWS = 128
# Past this many outputs a row of the product lies several pages from the next, and the tiles' writes
# miss the TLB: SmolLM2's LM head (49,152) stays with oneDNN.
AMX_MAX_OUTPUTS = 8192

_local = threading.local()  # one scratch per thread: weight services may run beside the steps


def native_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` in hardware (AVX512-BF16 / AMX) on the chosen CPU path
    (sidp.model.cpu_kernels: SIDP_CPU_ISA can force a lower one); float32 always is."""
    if dtype == torch.float32:
        return True
    path = cpu_kernels.chosen_path()
    if path in ("avx512", "avx2"):
        return False
    probes = (
        ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        if dtype == torch.bfloat16
        else ("_is_amx_fp16_supported",)
    )
    if path == "avx512_bf16":  # bf16 dot products, but not AMX's fp16 ones
        probes = probes[:1]
    # A torch without these probes is trusted to pick its own kernels.
    return any(getattr(torch.cpu, name, lambda: True)() for name in probes)


def compute_dtype(dtype: torch.dtype, device: str = "cpu") -> torch.dtype:
    """The dtype activations flow in: the model's own, or float32 where the CPU cannot multiply it.
    `device`: the planner asks on behalf of a GPU, which always multiplies the model's dtype."""
    return dtype if device != "cpu" or native_matmul(dtype) else torch.float32


@functools.cache
def widens_in_kernel() -> bool:
    """Whether sidp's widening kernel runs the products of 16-bit weights by float32 rows: every x86 CPU
    path is built with it (AVX2, FMA and F16C at least); `native` widens into a scratch instead. Looked up
    once per process, as the kernels' path is (cpu_kernels.ops): `linear` asks on every call."""
    return cpu_kernels.chosen_path() != "native"


def scratch_bytes(dtype: torch.dtype, device: str = "cpu") -> int:
    """What widening keeps per thread outside the kernel, for the memory ledger."""
    return 0 if compute_dtype(dtype, device) == dtype or widens_in_kernel() else SCRATCH_ELEMENTS * 4


def packs(dtype: torch.dtype) -> bool:
    """Whether `packed` puts weights of `dtype` in oneDNN's layout on this CPU.

    16-bit weights, where the CPU multiplies them in hardware: a prepacked weight spares oneDNN its
    per-call reordering, 1.4-1.8x for 1 to 256 rows of SmolLM2's gate/up on an AMX Xeon
    (docs/bench/matmul-dtypes-amx.json). float32 weights on AMD CPUs, where oneDNN multiplies a decode
    step's products faster than MKL, PyTorch's float32 route (benchmarks/matmul_float32.py,
    docs/BENCHMARKS.md); on Intel's, MKL measured as fast and float32 stays with it.
    """
    if dtype == torch.float32:
        return cpu_vendor() == "AuthenticAMD"
    return native_matmul(dtype) and _onednn_packs(dtype)


def packed(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in oneDNN's blocked layout where that multiplies faster (`packs`), else `weight` itself.
    The packed tensor takes the place of the plain one (same bytes); only `linear` can read it."""
    if weight.dim() != 2 or weight.device.type != "cpu" or not packs(weight.dtype):
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


@functools.cache
def _onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` weights on this CPU: bf16 needs AVX-512 or AVX-NE-CONVERT, which an
    AVX2 CPU lacks (where only a forced native_matmul asks)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(32, 32, dtype=dtype), None)
    except RuntimeError:
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x in compute dtype and weight in storage dtype (or `packed`); returns x's dtype."""
    if weight.is_mkldnn:
        if x.dim() == 2 and x.shape[0] <= AMX_MAX_ROWS and x.is_contiguous() and on_amx_tiles(weight):
            address = torch.ops.mkldnn.data_ptr(weight)
            if address % 64 == 0:  # tile rows must not straddle cache lines (oneDNN aligns its buffers)
                return cpu_kernels.ops().linear_amx(x, address, weight.shape[0], bias)
        return onednn_linear(x, weight, bias)
    if x.dtype == weight.dtype:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows < MIN_ROWS_TO_WIDEN:
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
    out_features, in_features = weight.shape
    if widens_in_kernel() and weight.stride(-1) == 1:
        if x.dim() == 2 and x.stride(-1) == 1:  # the decoder's rows (they may lie apart: a row stride)
            return cpu_kernels.ops().linear_widened(x, weight, bias)
        flat = x.reshape(rows, in_features)
        flat = flat if flat.stride(-1) == 1 else flat.contiguous()
        return cpu_kernels.ops().linear_widened(flat, weight, bias).view(*x.shape[:-1], out_features)
    few = rows <= FEW_ROWS and torch.get_num_threads() == 1
    chunk = max(1, min(out_features, (L2_CHUNK_ELEMENTS if few else SCRATCH_ELEMENTS) // in_features))
    scratch = _scratch()
    parts = []
    for start in range(0, out_features, chunk):
        n = min(chunk, out_features - start)
        w = scratch[: n * in_features].view(n, in_features).copy_(weight[start : start + n])
        parts.append(F.linear(x, w, None if bias is None else bias[start : start + n].to(x.dtype)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's product on a `packed` weight (what `linear` runs past sidp's AMX kernel)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def on_amx_tiles(weight: torch.Tensor) -> bool:
    """Whether sidp's AMX kernel multiplies this `packed` weight (a bf16 one on the amx path)."""
    out_features, in_features = weight.shape
    return weight.dtype == torch.bfloat16 and _amx_reads(out_features, in_features)


@functools.cache
def _amx_reads(out_features: int, in_features: int) -> bool:
    """Whether sidp's AMX kernel can read how oneDNN packs a bf16 [out_features, in_features] weight here.

    The kernel reads oneDNN's packed bytes in place, so they must lie as it expects: in blocks of 32
    rows, each its columns in pairs by the 32 rows by 2. Checked once per shape on a packed random
    weight, so that another oneDNN, or another choice of its, leaves the products with oneDNN."""
    if cpu_kernels.chosen_path() != "amx" or out_features > AMX_MAX_OUTPUTS:
        return False
    if out_features % 32 or in_features % 32:
        return False
    bits = torch.randint(0, 0x7F00, (out_features, in_features), dtype=torch.int16)  # finite bf16
    probe = torch.ops.mkldnn._reorder_linear_weight(bits.view(torch.bfloat16), None)
    if torch.ops.mkldnn._nbytes(probe) != bits.numel() * 2:
        return False
    stored = (ctypes.c_int16 * bits.numel()).from_address(torch.ops.mkldnn.data_ptr(probe))
    blocks = torch.frombuffer(stored, dtype=torch.int16).view(out_features // 32, in_features // 2, 32, 2)
    return torch.equal(blocks, bits.view(out_features // 32, 32, in_features // 2, 2).transpose(1, 2))


def _scratch() -> torch.Tensor:
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = torch.empty(SCRATCH_ELEMENTS, dtype=torch.float32)
    return scratch
