"""Widening products (bf16 weights, float32 activations) equal plain float32 products, chunked or not."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from sidp.model import cpu_kernels, linear


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("how", ["kernel", "scratch", "scratch-chunked"])
def test_widened_product_matches_float32(monkeypatch, how, rows):
    if how != "kernel":  # the path of CPUs without sidp's widening kernel (not x86)
        monkeypatch.setattr(linear, "widens_in_kernel", lambda: False)
    elif not linear.widens_in_kernel():
        pytest.skip("this CPU path has no widening kernel")
    if how == "scratch-chunked":  # 24 weight rows per chunk of a 100-row weight, in a fresh small scratch
        monkeypatch.setattr(linear, "SCRATCH_ELEMENTS", 24 * 40)
        monkeypatch.setattr(linear, "L2_CHUNK_ELEMENTS", 24 * 40)
        monkeypatch.setattr(linear, "_local", threading.local())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 if rows == 1 else 2, rows, 40, generator=g)  # one row alone is narrowed to bf16
    w = torch.randn(100, 40, generator=g).bfloat16()
    b = torch.randn(100, generator=g).bfloat16()
    ran = _ops_run(lambda: linear.linear(x, w, b))
    assert any(name.endswith("::linear_widened") for name in ran) == (how == "kernel" and rows > 1)
    got = linear.linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (*x.shape[:-1], 100)
    want = F.linear(x, w.float(), b.float())
    tol = 1e-5 if rows >= linear.MIN_ROWS_TO_WIDEN else 5e-2  # few rows are narrowed to bf16 instead
    torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("path", [p for p in cpu_kernels.supported_paths() if p != "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widening_kernel_on_every_path(path, dtype):
    """Shapes off every block size of the kernel (16 or 32 outputs a panel, 256 k deep, 6 or 12 rows at
    once, 8 by 8 transposes), x rows strided, with and without bias, against a float64 product."""
    g = torch.Generator().manual_seed(1)
    kernel = cpu_kernels.ops(path).linear_widened
    shapes = [(1, 1, 1), (7, 33, 300), (13, 16, 5), (25, 96, 576), (12, 40, 513), (5, 3, 0)]
    for rows, outputs, depth in shapes:
        x = torch.randn(rows, depth + 3, generator=g)[:, 3:]  # rows 3 elements apart from their length
        w = torch.randn(outputs, depth, generator=g).to(dtype)
        b = torch.randn(outputs, generator=g).to(dtype)
        for bias in (None, b):
            want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            got = kernel(x, w, bias)
            assert got.dtype == torch.float32 and got.shape == (rows, outputs)
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        kernel(torch.randn(2, 4), torch.randn(3, 4), None)


def test_same_dtype_is_plain_linear():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    assert torch.equal(linear.linear(x, w), F.linear(x, w))


def test_a_packed_float32_weight_multiplies_as_the_plain_one(monkeypatch):
    """Where float32 weights are packed for oneDNN (AMD CPUs: linear.packs), forced here on any CPU."""
    monkeypatch.setattr(linear, "packs", lambda dtype: True)
    g = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(2, 5, 40, generator=g),
        torch.randn(100, 40, generator=g),
        torch.randn(100, generator=g),
    )
    weight = linear.packed(w)
    assert weight.is_mkldnn and weight.shape == w.shape
    torch.testing.assert_close(linear.linear(x, weight, b), F.linear(x, w, b))
    torch.testing.assert_close(linear.linear(x[0], weight), F.linear(x[0], w))


def test_compute_dtype():
    assert linear.compute_dtype(torch.float32) == torch.float32
    wide = linear.compute_dtype(torch.bfloat16)
    assert wide == (torch.bfloat16 if linear.native_matmul(torch.bfloat16) else torch.float32)
    assert linear.scratch_bytes(torch.float32) == 0
    kept = 0 if wide == torch.bfloat16 or linear.widens_in_kernel() else linear.SCRATCH_ELEMENTS * 4
    assert linear.scratch_bytes(torch.bfloat16) == kept


def _amx() -> bool:
    return linear.on_amx_tiles(linear.packed(torch.zeros(64, 96, dtype=torch.bfloat16)))


needs_amx = pytest.mark.skipif(not _amx(), reason="sidp's AMX products run only where the amx CPU path runs")


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


@needs_amx
@pytest.mark.parametrize("rows", [1, 16, 17, 40, 56, 128])
def test_amx_product_rounds_the_float32_product(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).bfloat16()
    w = torch.randn(64, 96, generator=g).bfloat16()
    b = torch.randn(64, generator=g).bfloat16()
    packed = linear.packed(w)
    got = {name: linear.linear(x, packed, bias) for name, bias in (("plain", None), ("bias", b))}
    assert any(name.endswith("::linear_amx") for name in _ops_run(lambda: linear.linear(x, packed)))
    want = F.linear(x.float(), w.float())
    # One rounding of a float32 sum to bf16: half a bf16 ulp, 2^-9 relative.
    torch.testing.assert_close(got["plain"].float(), want, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(got["bias"].float(), want + b.float(), rtol=2**-8, atol=2**-8)


@needs_amx
def test_many_rows_and_wide_outputs_stay_with_onednn():
    packed = linear.packed(torch.randn(64, 96).bfloat16())
    many = torch.randn(linear.AMX_MAX_ROWS + 1, 96).bfloat16()
    assert "mkldnn::_linear_pointwise" in _ops_run(lambda: linear.linear(many, packed))
    assert not linear.on_amx_tiles(linear.packed(torch.zeros(linear.AMX_MAX_OUTPUTS + 32, 32).bfloat16()))
    assert not linear.on_amx_tiles(linear.packed(torch.zeros(48, 96).bfloat16()))  # not in blocks of 32


def test_amx_products_only_on_the_amx_path(monkeypatch):
    monkeypatch.setattr(linear.cpu_kernels, "chosen_path", lambda: "avx512_bf16")
    linear._amx_reads.cache_clear()
    try:
        assert not linear._amx_reads(64, 96)
    finally:
        linear._amx_reads.cache_clear()
