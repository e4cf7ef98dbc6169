"""Decode attention over the paged KV cache on CUDA: a Triton kernel with the same contract as the CPU
kernel in paged_attention.py (paged_decode_attention), held against the same gather reference in tests.

Triton is imported on first use, so this module imports without it; the kernels below are plain functions
until _kernels() compiles them with triton.jit. Setting TRITON_INTERPRET=1 before that runs them on CPU
tensors through Triton's interpreter (slow; the tests use it where there is no GPU).
"""

from __future__ import annotations

import functools
import threading

import torch

from sidp.errors import SidpError

triton = None  # bound by _kernels(); the kernel bodies look `tl` up in this module's globals when compiled
tl = None

_load_lock = threading.Lock()
_compiled: tuple | None = None

# Decode is memory-bound: what matters is that each K/V token is read once for the whole group of G query
# heads. Groups up to this size multiply as broadcast products summed with tl.sum: G * D FMAs per token,
# no padding, exact in float32. Larger groups use tl.dot, whose [G, D] x [D, tokens] runs on the tensor
# cores (bf16/fp16) as MMAs of 16 rows, so G is padded to 16: the padding rides in an MMA that is issued
# anyway (recent Triton pads M itself; older releases reject M < 16), while the [G, tokens, D] product tile
# of the products path would outgrow the registers. tl.dot's inner sides (D, and tokens for P @ V) must be
# >= 16 for 16-bit operands. The threshold is a guess that has not been timed on a GPU.
_MAX_GROUP_FOR_PRODUCTS = 4
# Elements per K (or V) tile, and of the [G, tokens, D] product tile of the products path: at 8192, ptxas
# (sm_90a, 4 warps) spilled for D=128, and 255 registers a thread leave room for few programs per SM.
_TILE_ELEMENTS = 4096
# Split-K: when sequences x KV heads cannot fill the GPU (a few long sequences), each one's context is
# cut into splits of at least this many tokens, run as separate programs and merged by a second kernel.
# The split count comes from the table's width, not from context_lens, so choosing it needs no sync; splits
# that start past a sequence's context run no tokens and the merge skips them.
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 64


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its context in the paged cache.

    Same contract as paged_attention.paged_decode_attention: q [B, H, D]; k_cache, v_cache
    [num_blocks, block_size, Hkv, D], contiguous, in q's dtype (fp32, bf16 or fp16); block_tables int32
    [B, max_blocks]; context_lens int32 [B], each >= 1 and within the table. Query head h reads KV head
    h // (H // Hkv). Returns [B, H, D] in q's dtype; softmax and sums are done in float32.

    Unlike the CPU kernel, block ids and context_lens are not checked: that would need the device's values
    on the host, a synchronisation per call. Table entries past a sequence's last block are never read.
    num_splits cuts each context into that many parts (split-K); None picks it from the GPU's size.
    """
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "bad q / cache rank"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q, k_cache and v_cache must share a dtype"
    assert q.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {q.dtype}"
    assert block_tables.dtype == context_lens.dtype == torch.int32, "block_tables, context_lens must be int32"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the caches must be contiguous"
    assert q.device == k_cache.device == v_cache.device == block_tables.device == context_lens.device
    B, H, D = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    assert cache_dim == D and H % num_kv_heads == 0, "q and the caches disagree on head_dim or heads"
    assert block_tables.shape[0] == context_lens.shape[0] == B, "one table row and length per sequence"
    assert B == 0 or block_tables.shape[1] > 0, "block_tables has no columns"
    decode, combine, interpreted = _compiled if _compiled is not None else _kernels()

    q = q.contiguous()  # small; may be a view into a fused QKV projection
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    out = torch.empty_like(q)
    if B == 0:
        return out
    group = H // num_kv_heads
    group_pad, dim_pad, tile, use_dot = _tile_shape(group, D)
    # Operands of the products path and of tl.dot on float32 caches are float32, multiplied exactly ("ieee",
    # not TF32). Triton's interpreter multiplies bf16 tl.dot operands as their raw bits, so under it they
    # are widened to float32 too; that leaves the bf16/fp16 tensor-core path to be checked on a GPU.
    if use_dot and q.dtype != torch.float32 and not interpreted:
        # The precision only applies to float32 operands.
        operand, precision = (tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16), "tf32"
    else:
        operand, precision = tl.float32, "ieee"
    max_tokens = block_tables.shape[1] * block_size  # a bound on every context known without a sync
    if num_splits is None:
        num_splits = _auto_splits(B * num_kv_heads, max_tokens, q.device)
    # Whole tiles per split, so that only the last tile of a context is ragged.
    split_tokens = _cdiv(_cdiv(max_tokens, max(num_splits, 1)), tile) * tile
    num_splits = _cdiv(max_tokens, split_tokens)

    if num_splits == 1:
        part_out = max_out = total_out = out  # unused: the kernel writes the normalised result to out
    else:
        part_out = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
        max_out = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
        total_out = torch.empty_like(max_out)
    decode[(B, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, max_out, total_out,
        scale, block_tables.stride(0), num_splits, split_tokens,
        H=H, HKV=num_kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=D, DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size, TILE=tile, USE_DOT=use_dot, OPERAND=operand, PRECISION=precision,
        SPLIT=num_splits > 1,
    )  # fmt: skip
    if num_splits > 1:
        combine[(B, H)](
            part_out, max_out, total_out, context_lens, out, num_splits, split_tokens,
            H=H, HEAD_DIM=D, DIM_PAD=dim_pad, SPLITS_PAD=_pow2(num_splits),
        )  # fmt: skip
    return out


def _tile_shape(group: int, head_dim: int) -> tuple[int, int, int, bool]:
    """(padded group, padded head_dim, tokens per loop step, use tl.dot) for one problem shape."""
    use_dot = group > _MAX_GROUP_FOR_PRODUCTS
    dim_pad = _pow2(head_dim)
    if use_dot:
        dim_pad = max(dim_pad, 16)
        return max(_pow2(group), 16), dim_pad, min(32, max(16, _TILE_ELEMENTS // dim_pad)), True
    group_pad = _pow2(group)
    return group_pad, dim_pad, min(64, max(8, _TILE_ELEMENTS // (group_pad * dim_pad))), False


def _auto_splits(programs: int, max_tokens: int, device: torch.device) -> int:
    """Enough splits for about two programs per multiprocessor, none shorter than _MIN_SPLIT_TOKENS."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    wanted = -(-2 * sms // programs)
    return max(1, min(wanted, max_tokens // _MIN_SPLIT_TOKENS, _MAX_SPLITS))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _kernels():
    global _compiled, triton, tl
    with _load_lock:
        if _compiled is None:
            try:
                import triton as triton_module
                import triton.language as tl_module
            except ImportError as e:
                raise SidpError(
                    "sidp's CUDA decode-attention kernel needs Triton, which is not installed "
                    f"(pip install triton, matching your torch build): {e}"
                ) from e
            triton, tl = triton_module, tl_module
            decode = triton.jit(_decode_kernel)
            interpreted = type(decode).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1
            _compiled = (decode, triton.jit(_combine_kernel), interpreted)
    return _compiled


def _decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_ptr, max_ptr, total_ptr,
    scale, table_stride, num_splits, split_tokens,
    H: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    USE_DOT: tl.constexpr, OPERAND: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, KV head, split): the group's query heads as one [GROUP_PAD, DIM_PAD]
    tile, K/V read TILE tokens at a time, with a running max and sum (online softmax)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(lens_ptr + seq)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, context)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    # A mask that varies along D would stop Triton from vectorising the K/V loads along it.
    dim_ok = tl.full([DIM_PAD], True, tl.int1) if DIM_PAD == HEAD_DIM else dims < HEAD_DIM
    q = tl.load(
        q_ptr + (seq * H + heads)[:, None] * HEAD_DIM + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    q = q.to(OPERAND)
    # exp2 is the native instruction; fold log2(e) into the scale once.
    qk_scale = scale * 1.4426950408889634

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    offsets = tl.arange(0, TILE)
    token_stride = HKV * HEAD_DIM
    for tile_start in range(start, end, TILE):
        pos = tile_start + offsets
        live = pos < end
        # A tile may span several blocks (or part of one): look each token's block up. Masked tokens read
        # no table entry, so entries past the last block are never touched.
        block = tl.load(tables_ptr + seq * table_stride + pos // BLOCK_SIZE, mask=live, other=0)
        row_off = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * token_stride + kv_head * HEAD_DIM
        kv_mask = live[:, None] & dim_ok[None, :]
        # Masked (not just -inf-scored): slots past the context may hold anything, NaN included.
        k = tl.load(k_ptr + row_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + row_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if USE_DOT:  # bf16/fp16 products are exact in the float32 that tl.dot accumulates in
            s = tl.dot(q, tl.trans(k.to(OPERAND)), input_precision=PRECISION, out_dtype=tl.float32)
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(live[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if USE_DOT:
            if v.dtype == tl.float32:
                acc += tl.dot(p, v, input_precision=PRECISION)
            else:
                # Tensor cores take p in v's dtype; rounding p once would lose most of the float32 softmax
                # (bf16 keeps 8 bits). p as the sum of two bf16/fp16 parts keeps ~16, below the output's
                # rounding, for one more MMA on a memory-bound loop.
                p_hi = p.to(v.dtype)
                p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
                v = v.to(OPERAND)
                acc += tl.dot(p_hi.to(OPERAND), v, input_precision=PRECISION)
                acc += tl.dot(p_lo.to(OPERAND), v, input_precision=PRECISION)
        else:
            acc += tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m = m_new

    store_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        # Unnormalised partials; the combine kernel weighs each split by its max and skips empty splits.
        row = (seq * H + heads) * num_splits + split
        tl.store(part_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=store_mask)
        tl.store(max_ptr + row, m, mask=row_ok)
        tl.store(total_ptr + row, total, mask=row_ok)
    else:
        result = acc / total[:, None]
        tl.store(
            out_ptr + (seq * H + heads)[:, None] * HEAD_DIM + dims[None, :],
            result.to(out_ptr.dtype.element_ty),
            mask=store_mask,
        )


def _combine_kernel(
    part_ptr, max_ptr, total_ptr, lens_ptr, out_ptr, num_splits, split_tokens,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, query head): merges its splits' partial sums into the output."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context = tl.load(lens_ptr + seq)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    # Splits that start past the context ran no tokens; their partials are never read.
    used = (splits < num_splits) & (splits * split_tokens < context)
    row = (seq * H + head) * num_splits + splits
    m = tl.load(max_ptr + row, mask=used, other=float("-inf"))
    total = tl.load(total_ptr + row, mask=used, other=0.0)
    part = tl.load(
        part_ptr + row[:, None] * HEAD_DIM + dims[None, :],
        mask=used[:, None] & (dims < HEAD_DIM)[None, :],
        other=0.0,
    )
    weight = tl.where(used, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    result = tl.sum(part * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
    tl.store(
        out_ptr + (seq * H + head) * HEAD_DIM + dims,
        result.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )
