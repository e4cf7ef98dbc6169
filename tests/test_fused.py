"""The compiled elementwise kernels against their op-by-op references, on every CPU path this CPU runs."""

from __future__ import annotations

import pytest
import torch

from sidp.model import cpu_kernels, fused

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PATHS = cpu_kernels.supported_paths()


@pytest.fixture(params=PATHS)
def ops(request):
    return cpu_kernels.ops(request.param)


def qkv_views(tokens: int, dtype: torch.dtype):
    """q [T, 9, 64] and k [T, 3, 64] as the decoder has them: strided views of one fused projection."""
    qkv = torch.randn(tokens, (9 + 3 + 3) * 64, dtype=dtype)
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    return q.view(tokens, 9, 64), k.view(tokens, 3, 64)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference in units of the dtype's precision (eps) times each element's size: one ulp
    is between 1 and 2 of these units."""
    eps = torch.finfo(a.dtype).eps
    return ((a.float() - b.float()).abs() / (b.float().abs() * eps + 1e-30)).max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (1, 7, 300))
def test_rms_norm(ops, dtype, rows):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 576, dtype=dtype), torch.randn(576, dtype=dtype)
    got, want = ops.rms_norm(x, w, 1e-5), fused.rms_norm_reference(x, w, 1e-5)
    # The mean's sum is ordered differently: its last bit, through two more roundings, moves the result
    # by a few units of precision at most.
    assert ulps_apart(got, want) <= 4.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_strided_heads(ops, dtype):
    q, _ = qkv_views(5, dtype)
    w = torch.randn(64, dtype=dtype)
    got = ops.rms_norm(q, w, 1e-6)
    assert got.is_contiguous() and ulps_apart(got, fused.rms_norm_reference(q, w, 1e-6)) <= 4.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual(ops, dtype):
    torch.manual_seed(0)
    h, delta, w = (
        torch.randn(33, 576, dtype=dtype),
        torch.randn(33, 576, dtype=dtype),
        torch.randn(576, dtype=dtype),
    )
    want_h = h + delta
    want = fused.rms_norm_reference(want_h, w, 1e-5)
    got = ops.add_rms_norm_(h, delta, w, 1e-5)
    assert torch.equal(h, want_h)  # the add rounds exactly as a separate add does
    assert ulps_apart(got, want) <= 4.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (1, 300))
def test_silu_and_mul(ops, dtype, rows):
    torch.manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1536, dtype=dtype) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # far tails and both zeros
    got, want = ops.silu_and_mul(gate_up), fused.silu_and_mul_reference(gate_up)
    assert got.shape == (rows, 1536)
    # exp's last bits may differ from PyTorch's: a few units of precision in float32; once narrowed to
    # bf16 that is one unit, and rare.
    assert ulps_apart(got, want) <= 4.0
    if dtype == torch.bfloat16:
        assert (got != want).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place(ops, dtype):
    torch.manual_seed(1)
    q, k = qkv_views(6, dtype)
    cos, sin = torch.randn(6, 64, dtype=dtype), torch.randn(6, 64, dtype=dtype)
    want_q, want_k = q.clone(), k.clone()
    fused.rotary_reference_(want_q, want_k, cos, sin)
    ops.rotary_(q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)  # same roundings, no fused multiply-add


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_write(ops, dtype):
    cache_k, cache_v = torch.zeros(4, 16, 3, 64, dtype=dtype), torch.zeros(4, 16, 3, 64, dtype=dtype)
    want_k, want_v = cache_k.clone(), cache_v.clone()
    _, k = qkv_views(5, dtype)
    v = torch.randn(5, 3, 64, dtype=dtype)
    slots = torch.tensor([63, 0, 17, 40, 5])
    fused.cache_write_reference_(want_k, want_v, slots, k, v)
    ops.cache_write_(cache_k, cache_v, slots, k, v)
    assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v)


def test_cache_write_narrows_float32_into_a_bf16_cache(ops):
    cache_k, cache_v = (
        torch.zeros(2, 16, 3, 64, dtype=torch.bfloat16),
        torch.zeros(2, 16, 3, 64, dtype=torch.bfloat16),
    )
    want_k, want_v = cache_k.clone(), cache_v.clone()
    k, v = torch.randn(3, 3, 64), torch.randn(3, 3, 64)
    slots = torch.tensor([31, 2, 9])
    fused.cache_write_reference_(want_k, want_v, slots, k, v)
    ops.cache_write_(cache_k, cache_v, slots, k, v)
    assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v)


def test_cache_write_refuses_a_slot_outside_the_cache(ops):
    cache = torch.zeros(2, 16, 3, 64)
    k = torch.zeros(1, 3, 64)
    with pytest.raises(RuntimeError, match="slot 32 is outside the cache"):
        ops.cache_write_(cache, cache.clone(), torch.tensor([32]), k, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (2, 64))
def test_greedy_argmax_picks_the_first_largest(ops, dtype, rows):
    logits = torch.randn(rows, 49152).to(dtype)
    logits[0, 7] = logits[0, 40000] = logits[0].max() + 1  # a tie: the first one wins
    logits[-1, :] = -float("inf")
    logits[-1, 30000] = float("inf")
    got = ops.greedy_argmax(logits)
    assert got.dtype == torch.int64 and torch.equal(got, fused.greedy_argmax_reference(logits))
    assert got[0] == 7 and got[-1] == 30000


def test_greedy_argmax_of_a_row_with_nan_or_only_minus_inf(ops):
    logits = torch.zeros(3, 40)
    logits[0, 30], logits[0, 9] = float("nan"), 5.0
    logits[1, :] = -float("inf")
    logits[2, 4], logits[2, 5] = float("nan"), float("nan")
    assert torch.equal(ops.greedy_argmax(logits), fused.greedy_argmax_reference(logits))


def test_kernels_refuse_what_they_cannot_read(ops):
    x = torch.randn(4, 576)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        ops.rms_norm(x, torch.randn(576, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="last dimension must be contiguous"):
        ops.rms_norm(x.t(), torch.randn(4), 1e-5)
    with pytest.raises(RuntimeError, match="dtype must be"):
        ops.silu_and_mul(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous 2-D logits"):
        ops.greedy_argmax(x.t())
