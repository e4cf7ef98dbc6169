"""Widening products (bf16 weights, float32 activations) equal plain float32 products, chunked or not."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from sidp.model import linear


@pytest.mark.parametrize("rows", [3, 17])
@pytest.mark.parametrize("chunked", [False, True])
def test_widened_product_matches_float32(monkeypatch, chunked, rows):
    if chunked:  # 24 weight rows per chunk of a 100-row weight, in a fresh small scratch
        monkeypatch.setattr(linear, "SCRATCH_ELEMENTS", 24 * 40)
        monkeypatch.setattr(linear, "L2_CHUNK_ELEMENTS", 24 * 40)
        monkeypatch.setattr(linear, "_local", threading.local())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, rows, 40, generator=g)
    w = torch.randn(100, 40, generator=g).bfloat16()
    b = torch.randn(100, generator=g).bfloat16()
    got = linear.linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (2, rows, 100)
    want = F.linear(x, w.float(), b.float())
    tol = 1e-5 if rows >= linear.MIN_ROWS_TO_WIDEN else 5e-2  # few rows are narrowed to bf16 instead
    torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)


def test_same_dtype_is_plain_linear():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    assert torch.equal(linear.linear(x, w), F.linear(x, w))


def test_compute_dtype():
    assert linear.compute_dtype(torch.float32) == torch.float32
    wide = linear.compute_dtype(torch.bfloat16)
    assert wide == (torch.bfloat16 if linear.native_matmul(torch.bfloat16) else torch.float32)
    assert linear.scratch_bytes(torch.float32) == 0
