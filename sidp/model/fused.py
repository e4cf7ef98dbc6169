"""A decoder layer's elementwise steps: compiled CPU kernels (sidp/csrc/fused_ops.cpp), each beside the
PyTorch op-by-op reference that defines it. Tensors on a GPU, and the tests, take the reference.

The kernels round to the tensor's dtype wherever the reference does (bf16 after every op), so the two
differ only in the order of RMSNorm's sum and in the last bit of SiLU's exponential.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidp.model import cpu_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of a 2-D or 3-D tensor whose rows are contiguous."""
    if x.is_cpu:
        return cpu_kernels.ops().rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm_(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += delta in place; returns RMSNorm(residual)."""
    if residual.is_cpu:
        return cpu_kernels.ops().add_rms_norm_(residual, delta, weight, eps)
    residual += delta
    return rms_norm_reference(residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused projection's output [rows, 2 * ffn]."""
    if gate_up.is_cpu:
        return cpu_kernels.ops().silu_and_mul(gate_up)
    return silu_and_mul_reference(gate_up)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotary embedding in place on q [T, H, D] and k [T, Hkv, D]; cos and sin [T, D]."""
    if q.is_cpu:
        cpu_kernels.ops().rotary_(q, k, cos, sin)
    else:
        rotary_reference_(q, k, cos, sin)


def cache_write_(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Token t's K/V [T, Hkv, D] into flat slot slots[t] of caches [blocks, block_size, Hkv, D]."""
    if k.is_cpu:
        cpu_kernels.ops().cache_write_(k_cache, v_cache, slots, k, v)
    else:
        cache_write_reference_(k_cache, v_cache, slots, k, v)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest logit (int64 [rows]), in the logits' own dtype."""
    if logits.is_cpu:
        return cpu_kernels.ops().greedy_argmax(logits)
    return greedy_argmax_reference(logits)


# --- the references ------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and scale in the model dtype, the order transformers uses.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_reference_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for x in (q, k):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * cos[:, None] + rotated * sin[:, None])


def cache_write_reference_(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def greedy_argmax_reference(logits: torch.Tensor) -> torch.Tensor:
    # max(...).indices: the first maximal index, like argmax, and 2.7x faster on a CPU (64 x 49152 float32).
    return logits.max(dim=-1).indices
