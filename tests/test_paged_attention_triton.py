"""The Triton paged decode-attention kernel against the gather reference, on the CPU kernel's test problems.

On a CUDA machine the kernel runs compiled, over many shapes. Elsewhere, when Triton is installed, it runs
in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported) over a few small shapes, since
the interpreter executes each program in Python; test_compiles_for_hopper then also compiles it for sm_90
without a GPU. Without Triton these tests are skipped, except the one that checks the error it raises.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by triton.jit, so it must be set before first use

from test_paged_attention import RTOL, float32_reference, make_problem  # noqa: E402

import sidp.model.paged_attention_triton as module  # noqa: E402
from sidp.errors import SidpError  # noqa: E402
from sidp.model.paged_attention_triton import paged_decode_attention_triton  # noqa: E402

try:
    import triton  # noqa: F401 (after TRITON_INTERPRET: it decides how Triton's own functions are built)

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
INTERPRETED = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"

has_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (CUDA or INTERPRETED),
    reason="Triton is not installed (pip install triton)"
    if not HAS_TRITON
    else "no CUDA GPU, and TRITON_INTERPRET is set to something other than 1",
)

# (heads, kv_heads) per group size; groups above 4 take the tl.dot path, the rest the products path.
HEADS = {1: (4, 4), 2: (4, 2), 4: (8, 2), 8: (16, 2)}
# The interpreter runs every program in Python: a few cases, every group size, head_dim and block size
# among them, each of the two paths with float32 and both 16-bit types. On a GPU, every combination.
if CUDA:
    SHAPES = list(
        itertools.product(HEADS, [32, 64, 128], [16, 32], [torch.float32, torch.bfloat16, torch.float16])
    )
else:
    SHAPES = [
        (1, 64, 16, torch.float32),
        (2, 32, 32, torch.bfloat16),
        (4, 128, 16, torch.float32),
        (8, 64, 16, torch.bfloat16),
        (8, 128, 32, torch.float32),
        (4, 64, 16, torch.float16),
        (1, 128, 32, torch.bfloat16),
        (2, 128, 16, torch.float32),
        (8, 32, 16, torch.float16),
    ]


def on_device(problem):
    return tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in problem)


def context_lengths(block_size: int) -> list[int]:
    """One token, exactly a block, a block and one, and a long context (many tiles, several splits)."""
    lens = [1, block_size, block_size + 1, 700]
    if CUDA:  # a wider batch, with lengths either side of every multiple of 64 up to 700
        lens += [n + d for n in range(64, 700, 64) for d in (-1, 0, 1)]
    return lens


def rtol(dtype: torch.dtype) -> float:
    # Triton's interpreter casts float32 to bf16 by truncating (a GPU rounds to nearest), which can be a
    # whole bf16 ulp off (2^-7 relative) rather than half of one.
    return 2**-7 if INTERPRETED and dtype == torch.bfloat16 else RTOL[dtype]


def check(out, problem, dtype):
    assert out.dtype == dtype and out.shape == problem[0].shape and out.device.type == DEVICE
    # float32 softmax and sums over the same inputs, rounded once to dtype: the CPU kernel's tolerances.
    # The GPU's bf16/fp16 path feeds p to the tensor cores as a sum of two 16-bit parts (~16 bits of p,
    # 2^-17 relative), well inside bf16's 2^-8 and fp16's 2^-11.
    expected = float32_reference(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in problem))
    torch.testing.assert_close(out.float().cpu(), expected, rtol=rtol(dtype), atol=1e-5)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3, None] if CUDA else [1, 3], ids=lambda n: f"splits={n}")
@pytest.mark.parametrize(
    "group, head_dim, block_size, dtype", SHAPES, ids=lambda v: str(v).removeprefix("torch.")
)
def test_matches_reference(group, head_dim, block_size, dtype, num_splits):
    problem = on_device(make_problem(context_lengths(block_size), *HEADS[group], head_dim, block_size, dtype))
    check(paged_decode_attention_triton(*problem, num_splits=num_splits), problem, dtype)


@needs_triton
@pytest.mark.parametrize(
    "heads, head_dim, block_size, dtype",
    [((5, 5), 40, 8, torch.float32), ((6, 2), 80, 24, torch.bfloat16), ((12, 2), 96, 16, torch.float32)],
    ids=["dim40-block8", "dim80-block24", "group6-dim96"],
)
def test_uneven_shapes(heads, head_dim, block_size, dtype):
    """head_dim not a power of two (masked lanes), block sizes that are not, and a group padded to 16."""
    problem = on_device(
        make_problem([1, 9, block_size + 1, 150], *heads, head_dim, block_size, dtype, seed=3)
    )
    for num_splits in (1, 2):
        check(paged_decode_attention_triton(*problem, num_splits=num_splits), problem, dtype)


@needs_triton
@pytest.mark.parametrize("group", [2, 8], ids=["products", "dot"])
def test_never_reads_past_the_context(group):
    """Every cache slot outside the sequences' contexts (the tail of each last block, the spare blocks)
    holds NaN: one read of it, even masked to zero weight afterwards, would turn the output into NaN."""
    block_size, dtype = 16, torch.float32
    lens = [1, 16, 17, 90]
    q, k, v, tables, lens_t, scale = make_problem(lens, *HEADS[group], 64, block_size, dtype)
    expected = float32_reference(q, k, v, tables, lens_t, scale)
    inside = torch.zeros(k.shape[:2], dtype=torch.bool)
    for b, n in enumerate(lens):
        for t in range(n):
            inside[tables[b, t // block_size], t % block_size] = True
    k[~inside], v[~inside] = float("nan"), float("nan")
    for num_splits in (1, 3):
        out = paged_decode_attention_triton(
            *on_device((q, k, v, tables, lens_t, scale)), num_splits=num_splits
        )
        torch.testing.assert_close(out.cpu(), expected, rtol=rtol(dtype), atol=1e-5)


@needs_triton
def test_single_token_context_returns_its_value():
    q, k, v, tables, lens, scale = make_problem([1, 1], 8, 2, 64, 16, torch.float32)
    out = paged_decode_attention_triton(*on_device((q, k, v, tables, lens, scale)))
    expected = v[tables[:, 0].long(), 0].repeat_interleave(4, dim=1)  # softmax over one key is 1
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-6, atol=1e-6)


@needs_triton
def test_non_contiguous_query_and_empty_batch():
    q, k, v, tables, lens, scale = on_device(make_problem([5, 40], 8, 2, 64, 16, torch.float32))
    fused = torch.cat([q, torch.zeros_like(q)], dim=-1)[..., :64]  # a view, as after splitting a fused QKV
    assert not fused.is_contiguous()
    torch.testing.assert_close(
        paged_decode_attention_triton(fused, k, v, tables, lens, scale),
        paged_decode_attention_triton(q, k, v, tables, lens, scale),
        rtol=0,
        atol=0,
    )
    empty = paged_decode_attention_triton(q[:0], k, v, tables[:0], lens[:0], scale)
    assert empty.shape == (0, 8, 64)


def test_split_choice(monkeypatch):
    """Splits only when sequences x KV heads leave multiprocessors idle, none shorter than 256 tokens."""
    assert module._auto_splits(4, 100_000, torch.device("cpu")) == 1
    monkeypatch.setattr(module, "_multiprocessors", lambda index: 132)
    gpu = torch.device("cuda", 0)
    assert module._auto_splits(132, 100_000, gpu) == 1  # already a program per multiprocessor
    assert module._auto_splits(8, 100_000, gpu) == 33  # two programs per multiprocessor
    assert module._auto_splits(8, 1000, gpu) == 3
    assert module._auto_splits(1, 10**7, gpu) == module._MAX_SPLITS
    # (group padded, head_dim padded, tokens per step, tl.dot): 16 rows for tl.dot, lanes masked past 80.
    assert module._tile_shape(8, 80) == (16, 128, 32, True)
    assert module._tile_shape(3, 64) == (4, 64, 16, False)


def test_missing_triton_is_a_sidp_error(monkeypatch):
    monkeypatch.setattr(module, "_compiled", None)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    problem = make_problem([3], 4, 2, 32, 16, torch.float32)
    with pytest.raises(SidpError, match="needs Triton"):
        paged_decode_attention_triton(*problem)


HOPPER_CASES = [(2, "bf16"), (8, "bf16"), (8, "fp32")]  # (group, dtype): both paths, tensor cores or not


@has_triton
@pytest.mark.skipif(CUDA, reason="on a GPU the kernels run compiled in the other tests")
def test_compiles_for_hopper():
    """The interpreter skips Triton's compiler, which rejects more (tile shapes, loop-carried types): compile
    both kernels for sm_90 here, down to ptxas. A process that imported Triton with TRITON_INTERPRET=1 has
    its library functions made interpreter-only, so this runs in a fresh one."""
    code = "import test_paged_attention_triton as t; [t.compile_for_hopper(*c) for c in t.HOPPER_CASES]"
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def compile_for_hopper(group: int, dtype: str) -> None:
    """Compile both kernels for sm_90 without a GPU; check that K/V load 16 bytes at a time and that only the
    bf16 tl.dot path uses the tensor cores."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module._kernels()  # binds `tl` in the module
    target = GPUTarget("cuda", 90, 32)
    heads, kv_heads = HEADS[group]
    group_pad, dim_pad, tile, use_dot = module._tile_shape(group, 128)
    pointer = f"*{dtype}"
    kernel = JITFunction(module._decode_kernel)
    types = dict(tables_ptr="*i32", lens_ptr="*i32", part_ptr="*fp32", max_ptr="*fp32", total_ptr="*fp32")
    types |= dict(scale="fp32", table_stride="i32", num_splits="i32", split_tokens="i32")
    signature = {a: types.get(a, pointer if a.endswith("_ptr") else "constexpr") for a in kernel.arg_names}
    constants = dict(
        H=heads, HKV=kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=128, DIM_PAD=dim_pad,
        BLOCK_SIZE=16, TILE=tile, USE_DOT=use_dot, OPERAND={"bf16": tl.bfloat16, "fp32": tl.float32}[dtype],
        PRECISION="ieee" if dtype == "fp32" else "tf32", SPLIT=True,
    )  # fmt: skip
    # As Triton's launcher marks tensors it sees are 16-byte aligned.
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names) if a.endswith("_ptr")}
    ptx = triton.compile(ASTSource(kernel, signature, constants, aligned), target=target).asm["ptx"]
    assert bool(re.search(r"\bw?mma\.", ptx)) == (use_dot and dtype == "bf16"), (group, dtype)
    assert "ld.global.v4" in ptx, (group, dtype)
    combine = JITFunction(module._combine_kernel)
    signature = dict(
        part_ptr="*fp32", max_ptr="*fp32", total_ptr="*fp32", lens_ptr="*i32", out_ptr=pointer,
        num_splits="i32", split_tokens="i32",
        H="constexpr", HEAD_DIM="constexpr", DIM_PAD="constexpr", SPLITS_PAD="constexpr",
    )  # fmt: skip
    constants = dict(H=heads, HEAD_DIM=128, DIM_PAD=128, SPLITS_PAD=16)
    triton.compile(ASTSource(combine, signature, constants), target=target)
