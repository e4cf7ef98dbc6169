"""The compiled paged decode-attention kernel, on every CPU path this CPU runs, against the gather reference
and against PyTorch's SDPA on each sequence's K/V laid out contiguously. The first test of a path in a
session may compile its kernels (~10 s)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from sidp.model import cpu_kernels
from sidp.model.paged_attention import paged_decode_attention, paged_decode_attention_reference

# Results are computed in float32 and rounded once to the output dtype, so they may be off by half an ulp
# of that dtype (2^-8 relative for bf16, 2^-11 for fp16) plus float32 summation-order noise.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.fixture(params=cpu_kernels.supported_paths())
def kernel(request):
    """The op of one path: the AMX path multiplies bf16 on tiles, AVX512-BF16 takes bf16 dot products
    straight from the cache, others widen."""
    return cpu_kernels.ops(request.param).paged_decode_attention


def make_problem(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random q and caches, each sequence's blocks scattered through the cache in shuffled order, and
    table entries past a sequence's blocks set to ids that do not exist, so reading one would fail."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int32)
    per_seq = [-(-int(n) // block_size) for n in lens]
    num_blocks = sum(per_seq) + 7  # spare blocks that belong to nobody
    order = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = torch.full((len(lens), max(per_seq) + 2), 2**31 - 1, dtype=torch.int32)
    used = 0
    for b, count in enumerate(per_seq):
        tables[b, :count] = order[used : used + count]
        used += count
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(len(lens), num_heads, head_dim, generator=g).to(dtype)
    return q, k, v, tables, lens, head_dim**-0.5


@contextlib.contextmanager
def one_thread():
    """The references run many tiny ops; on a busy machine each multi-threaded one can wait a whole
    scheduler slice for its second thread. The kernel keeps the default threads, so its split is tested."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def sdpa_unpaged(q, k_cache, v_cache, tables, lens, scale):
    """Float32 SDPA over each sequence's K/V copied out block by block into one contiguous tensor."""
    block_size = k_cache.shape[1]
    out = []
    for b, n in enumerate(lens.tolist()):
        blocks = tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].transpose(0, 1).float()  # [Hkv, n, D]
        v = v_cache[blocks].flatten(0, 1)[:n].transpose(0, 1).float()
        o = F.scaled_dot_product_attention(q[b, :, None].float(), k, v, scale=scale, enable_gqa=True)
        out.append(o[:, 0])
    return torch.stack(out)


@one_thread()
def float32_reference(q, k, v, tables, lens, scale):
    return paged_decode_attention_reference(q.float(), k.float(), v.float(), tables, lens, scale)


def lengths(batch: int, block_size: int) -> list[int]:
    """1, exact multiples of block_size and the lengths either side of them, then a spread up to 300."""
    edge = [1, block_size, 2 * block_size, block_size - 1, block_size + 1, 3 * block_size, 17]
    spread = torch.randint(1, 300, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    return (edge + spread)[:batch] if batch > 1 else [3 * block_size]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3)], ids=["group1", "group3"])
@pytest.mark.parametrize("batch", [1, 37])
def test_matches_reference_and_sdpa(kernel, dtype, block_size, heads, batch):
    problem = make_problem(lengths(batch, block_size), *heads, 64, block_size, dtype)
    out = kernel(*problem)
    assert out.dtype == dtype and out.shape == problem[0].shape
    rtol = RTOL[dtype]
    torch.testing.assert_close(out.float(), float32_reference(*problem), rtol=rtol, atol=1e-5)
    torch.testing.assert_close(out.float(), sdpa_unpaged(*problem), rtol=rtol, atol=1e-5)
    # The reference run in the inputs' dtype rounds the same float32 values: at most one ulp apart.
    torch.testing.assert_close(out, paged_decode_attention_reference(*problem), rtol=2 * rtol, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_query_over_a_16_bit_cache(kernel, cache_dtype):
    """A model computed in float32 over a bf16 or fp16 cache (a CPU without bf16 products): q and the
    output stay float32, unrounded, so the kernel equals the float32 reference over the widened cache."""
    q, *rest = make_problem(lengths(37, 16), 9, 3, 64, 16, cache_dtype)
    problem = (torch.randn(q.shape, generator=torch.Generator().manual_seed(5)), *rest)
    out = kernel(*problem)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, float32_reference(*problem), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, paged_decode_attention_reference(*problem), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="q have it or be float32"):
        kernel(problem[0].to(torch.float16 if cache_dtype == torch.bfloat16 else torch.bfloat16), *rest)


def test_reference_matches_sdpa():
    problem = make_problem(lengths(37, 16), 9, 3, 64, 16, torch.float32)
    torch.testing.assert_close(
        paged_decode_attention_reference(*problem), sdpa_unpaged(*problem), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "heads, head_dim, block_size",
    [
        ((8, 2), 128, 16),
        ((5, 5), 40, 8),
        ((6, 2), 80, 24),
        ((14, 2), 64, 16),
        ((6, 2), 96, 24),
        ((17, 1), 32, 16),
    ],
    ids=["llama-like", "dim40-block8", "dim80-block24", "group7", "dim96-block24", "group17"],
)
def test_other_shapes(kernel, dtype, heads, head_dim, block_size):
    """head_dim not a multiple of the vector width (nor, for bf16 dot products and tiles, of 32), block
    sizes that split 16 tokens across blocks, a head_dim that fills 64-dim tiles unevenly, a group larger
    than the four heads summed at once, and one larger than a tile's 16 rows (the AMX path hands it on)."""
    problem = make_problem(lengths(11, block_size), *heads, head_dim, block_size, dtype, seed=3)
    rtol = RTOL[dtype]
    torch.testing.assert_close(kernel(*problem).float(), sdpa_unpaged(*problem), rtol=rtol, atol=1e-5)


def test_single_token_context_returns_its_value(kernel):
    q, k, v, tables, lens, scale = make_problem([1, 1], 9, 3, 64, 16, torch.float32)
    out = kernel(q, k, v, tables, lens, scale)
    expected = v[tables[:, 0].long(), 0].repeat_interleave(3, dim=1)  # [B, H, D]: softmax over one key is 1
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_non_contiguous_query():
    q, k, v, tables, lens, scale = make_problem([5, 40, 77], 9, 3, 64, 16, torch.float32)
    fused = torch.cat([q, torch.zeros_like(q)], dim=-1)[..., :64]  # a view, as after splitting a fused QKV
    assert not fused.is_contiguous()
    torch.testing.assert_close(
        paged_decode_attention(fused, k, v, tables, lens, scale),
        paged_decode_attention(q, k, v, tables, lens, scale),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_rows_of_the_fused_projection_are_read_in_place(kernel, dtype):
    q, k, v, tables, lens, scale = make_problem([5, 40, 77], 9, 3, 64, 16, dtype)
    rows = torch.cat([q.flatten(1), torch.full((3, 2 * 3 * 64), float("nan"), dtype=dtype)], dim=1)
    in_place = rows[:, : 9 * 64].view(3, 9, 64)  # q as the decoder splits it off q|k|v: rows 1,536 apart
    assert in_place.stride(0) == 15 * 64
    got = kernel(in_place, k, v, tables, lens, scale)
    torch.testing.assert_close(got, kernel(q, k, v, tables, lens, scale), rtol=0, atol=0)


def corrupt_block_id(p):
    p[3][0, 0] = p[1].shape[0]


def empty_context(p):
    p[4][0] = 0


def context_past_table(p):
    p[4][0] = p[3].shape[1] * p[1].shape[1] + 1


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (corrupt_block_id, "is not a block of the cache"),
        (empty_context, "context_lens"),
        (context_past_table, "context_lens"),
    ],
)
def test_rejects_tables_that_would_read_outside_the_cache(corrupt, message):
    problem = make_problem([20, 33], 9, 3, 64, 16, torch.float32)
    corrupt(problem)
    with pytest.raises(RuntimeError, match=message):
        paged_decode_attention(*problem)
