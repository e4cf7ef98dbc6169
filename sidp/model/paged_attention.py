"""Decode attention over the paged KV cache: the compiled CPU kernel, and the gather-based PyTorch reference
that tests and benchmarks hold it against.

The kernel is sidp/csrc/paged_attention.cpp, built by sidp.model.cpu_kernels.
"""

from __future__ import annotations

import torch

from sidp.model import cpu_kernels


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new token per sequence over its context in the paged cache.

    q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] in q's dtype (fp32, bf16 or fp16), or
    in bf16 or fp16 under a float32 q (a model computed in float32 over a 16-bit cache);
    block_tables int32 [B, max_blocks]; context_lens int32 [B], each >= 1, counting the new token, whose
    K/V must already be in the cache. Query head h reads KV head h // (H // Hkv). Returns [B, H, D] in q's
    dtype; softmax and sums are done in float32.
    """
    # The kernel re-checks everything it relies on; these only make a wrong call read better.
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "bad q / cache rank"
    assert k_cache.dtype == v_cache.dtype, "k_cache and v_cache must share a dtype"
    assert q.dtype in (k_cache.dtype, torch.float32), "q must be in the cache's dtype or float32"
    assert block_tables.dtype == context_lens.dtype == torch.int32, "block_tables, context_lens must be int32"
    # The caches must already be contiguous.
    return cpu_kernels.ops().paged_decode_attention(
        heads_contiguous(q), k_cache, v_cache, block_tables, context_lens, scale
    )


def paged_decode_attention_tiles(
    q: torch.Tensor,
    k_tiles: torch.Tensor,
    v_tiles: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """paged_decode_attention over a bf16 cache in the tiles layout (sidp/model/kv_cache.py): k_tiles
    [N, Hkv, D/2, block_size, 2], v_tiles [N, Hkv, block_size/2, D, 2]. CPUs with AMX only."""
    return cpu_kernels.ops().paged_decode_attention_tiles(
        heads_contiguous(q), k_tiles, v_tiles, block_tables, context_lens, scale
    )


def heads_contiguous(q: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] as the kernels read it: each sequence's heads contiguous. Rows of the fused QKV
    projection already are, and are read in place; anything else is copied."""
    return q if q.stride(2) == 1 and q.stride(1) == q.shape[2] else q.contiguous()


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Same contract as paged_decode_attention: gathers each sequence's blocks into a padded
    [B, L, Hkv, D] copy and runs a masked float32 softmax over it."""
    B, H, D = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = H // num_kv_heads
    max_len = int(context_lens.max())
    num_blocks = -(-max_len // block_size)
    lens = context_lens.long()
    # Entries past a sequence's last block may be anything; point them at block 0 so the gather stays legal.
    used = torch.arange(num_blocks, device=q.device) < ((lens + block_size - 1) // block_size)[:, None]
    ids = torch.where(used, block_tables[:, :num_blocks].long(), 0)

    def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [B, Hkv, L, D] float32
        rows = cache[ids].reshape(B, num_blocks * block_size, num_kv_heads, D)[:, :max_len]
        return rows.transpose(1, 2).float()

    k, v = gather(k_cache), gather(v_cache)
    qg = q.float().reshape(B, num_kv_heads, group, D)
    scores = (qg @ k.transpose(2, 3)) * scale  # [B, Hkv, G, L]
    pad = torch.arange(max_len, device=q.device) >= lens[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # [B, Hkv, G, D]
    return out.reshape(B, H, D).to(q.dtype)
