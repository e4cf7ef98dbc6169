"""One layer's paged KV cache, in one of two layouts, and the three things a step does with it: write the
new tokens' K/V, attend a decode token to its context, gather a prefill chunk's context.

- Rows (`KVCache`): [num_blocks, block_size, kv_heads, head_dim] for keys and for values, a token's
  heads side by side, as the projection produces them. Every device and dtype.
- Tiles (`TiledKVCache`), for bf16 on CPUs with AMX: each block's keys and values of one KV head are one
  stretch of memory, already in the order AMX tiles multiply them. Keys [num_blocks, kv_heads,
  head_dim/2, block_size, 2] (pairs of dims, 16 tokens across), values [num_blocks, kv_heads,
  block_size/2, head_dim, 2] (pairs of tokens). A decode step then reads every tile as rows that lie one
  after another, and repacks nothing (docs/BENCHMARKS.md has the kernel's times in both layouts).

Both hold the same bytes, so the memory plan does not depend on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sidp.model import cpu_kernels
from sidp.model.fused import cache_write_
from sidp.model.paged_attention import paged_decode_attention, paged_decode_attention_tiles

TILE = 16  # tokens, dim pairs and query heads per tile


@dataclass(slots=True)
class KVCache:
    """The rows layout: [num_blocks, block_size, kv_heads, head_dim] for keys and for values."""

    k: torch.Tensor
    v: torch.Tensor

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Token t's K/V [T, Hkv, D] into flat slot slots[t]."""
        cache_write_(self.k, self.v, slots, k, v)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V [T, Hkv, D] of flat slots `slots`."""
        kv_heads, head_dim = self.k.shape[-2:]
        return self.k.view(-1, kv_heads, head_dim)[slots], self.v.view(-1, kv_heads, head_dim)[slots]

    def decode(self, q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float):
        """paged_decode_attention of q [B, H, D] over this cache: q in the cache's dtype, or on the CPU in
        float32 over a 16-bit cache (the compute dtype of a CPU without bf16 products), answered in q's."""
        if not q.is_cuda:
            return paged_decode_attention(q, self.k, self.v, block_tables, context_lens, scale)
        # imported here: the CPU path never needs triton
        from sidp.model.paged_attention_triton import paged_decode_attention_triton

        return paged_decode_attention_triton(q, self.k, self.v, block_tables, context_lens, scale)


class TiledKVCache(KVCache):
    """The tiles layout (module docstring): k [N, Hkv, D/2, bs, 2], v [N, Hkv, bs/2, D, 2]."""

    __slots__ = ()

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        cpu_kernels.ops().cache_write_tiles_(self.k, self.v, slots, k, v)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, kv_heads, pairs, block_size, _ = self.k.shape
        blocks, at = slots // block_size, slots % block_size
        k = self.k[blocks, :, :, at, :]  # [T, Hkv, D/2, 2]
        v = self.v[blocks, :, at // 2, :, at % 2]  # [T, Hkv, D]
        return k.reshape(len(slots), kv_heads, 2 * pairs), v

    def decode(self, q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float):
        return paged_decode_attention_tiles(q, self.k, self.v, block_tables, context_lens, scale)


def tiles_fit(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, device: str
) -> bool:
    """Whether a cache of these shapes takes the tiles layout: bf16 on a CPU whose chosen path has AMX
    (SIDP_CPU_ISA can choose another), block_size a multiple of 16, head_dim of 32, at most 16 query heads
    per KV head."""
    return (
        device == "cpu"
        and dtype == torch.bfloat16
        and block_size % TILE == 0
        and head_dim % (2 * TILE) == 0
        and num_heads // num_kv_heads <= TILE
        and cpu_kernels.chosen_path() == "amx"
    )


def new_kv_cache(
    num_blocks: int,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
) -> KVCache:
    """An empty cache for one layer, in the tiles layout where it fits, else in rows."""
    if not tiles_fit(num_heads, num_kv_heads, head_dim, block_size, dtype, device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return KVCache(
            torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)
        )
    k_shape = (num_blocks, num_kv_heads, head_dim // 2, block_size, 2)
    v_shape = (num_blocks, num_kv_heads, block_size // 2, head_dim, 2)
    return TiledKVCache(torch.empty(k_shape, dtype=dtype), torch.empty(v_shape, dtype=dtype))


def to_tiles(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows-layout caches [N, bs, Hkv, D] as new tiles-layout ones (for tests and benchmarks)."""
    n, bs, kv_heads, d = k.shape
    k_tiles = k.view(n, bs, kv_heads, d // 2, 2).permute(0, 2, 3, 1, 4).contiguous()
    v_tiles = v.view(n, bs // 2, 2, kv_heads, d).permute(0, 3, 1, 4, 2).contiguous()
    return k_tiles, v_tiles
