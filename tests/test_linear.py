"""The float32-through-scratch product equals a plain product, chunked or not, with or without bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sidp.model import linear


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upcast_product_matches_plain(monkeypatch, dtype, chunked):
    if chunked:
        monkeypatch.setattr(linear, "SCRATCH_ELEMENTS", 24 * 40)  # 24 weight rows per chunk of 100
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, 40, generator=g).to(dtype)
    w = torch.randn(100, 40, generator=g).to(dtype)
    b = torch.randn(100, generator=g).to(dtype)
    mm = linear.Matmul(dtype)
    mm.upcast = True
    want = F.linear(x.float(), w.float(), b.float())
    got = mm.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (2, 17, 100)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.to(dtype).float(), atol=tol, rtol=tol)


def test_few_rows_stay_native():
    mm = linear.Matmul(torch.bfloat16)
    mm.upcast = True
    x = torch.randn(3, 8).bfloat16()
    w = torch.randn(5, 8).bfloat16()
    assert torch.equal(mm.linear(x, w), F.linear(x, w))
