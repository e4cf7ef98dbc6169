"""Attention over the paged KV cache, for a step that mixes decode tokens and prefill chunks.

A step's tokens are laid out decode sequences first (one token each), then prefill chunks. Decode
sequences are served together by the paged decode kernel (C++ on CPU, Triton on CUDA), which reads K/V
where they lie. Each
prefill chunk runs scaled-dot-product attention over its own context: its new K/V straight from the
projection when nothing was cached before it, otherwise its cached blocks gathered by slot.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sidp.model.kv_cache import KVCache


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of this chunk in the step's token layout
    end: int
    context_slots: torch.Tensor | None  # cache slots of the whole context; None when no prefix was cached
    mask: torch.Tensor | None  # [chunk, context] bool; None means plain causal over the chunk alone


@dataclass(slots=True)
class AttentionBatch:
    positions: torch.Tensor  # [tokens] int64
    slot_mapping: torch.Tensor  # [tokens] int64: where each new token's K/V goes
    num_decode: int
    decode_block_tables: torch.Tensor  # [num_decode, max_blocks] int32
    decode_context_lens: torch.Tensor  # [num_decode] int32
    prefills: list[PrefillChunk]

    def to(self, device: str) -> AttentionBatch:
        """The same batch on `device` (built on the CPU from Python lists, then moved in one go)."""
        if device == "cpu":
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(
            self,
            positions=move(self.positions),
            slot_mapping=move(self.slot_mapping),
            decode_block_tables=move(self.decode_block_tables),
            decode_context_lens=move(self.decode_context_lens),
            prefills=[
                replace(c, context_slots=move(c.context_slots), mask=move(c.mask)) for c in self.prefills
            ],
        )


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """q [tokens, heads, dim], k/v [tokens, kv_heads, dim] for this step's tokens → [tokens, heads, dim].

    q/k/v come in the compute dtype, which may be wider than the cache's (see linear.py).
    """
    cache.write(batch.slot_mapping, k, v)
    decoded = None
    if batch.num_decode:
        tables, lens = batch.decode_block_tables, batch.decode_context_lens
        decoded = cache.decode(q[: batch.num_decode], tables, lens, scale)
        if not batch.prefills:  # most steps: no rows to place beside the kernel's
            return decoded  # in q's dtype: each decode kernel answers in it
    out = torch.empty_like(q)
    if decoded is not None:
        out[: batch.num_decode] = decoded
    for chunk in batch.prefills:
        if chunk.context_slots is None:
            keys, values = k[chunk.start : chunk.end], v[chunk.start : chunk.end]
        else:
            keys, values = (t.to(q.dtype) for t in cache.gather(chunk.context_slots))
        # A batch dimension of one: with 3-D inputs PyTorch's CPU SDPA takes its unfused math path
        # (a materialised score matrix, ~5x slower); with 4-D ones, its flash kernel.
        out[chunk.start : chunk.end] = F.scaled_dot_product_attention(
            q[None, chunk.start : chunk.end].transpose(1, 2),
            keys[None].transpose(1, 2),
            values[None].transpose(1, 2),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=scale,
            enable_gqa=True,
        )[0].transpose(0, 1)
    return out
