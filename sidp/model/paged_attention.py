"""Decode attention over the paged KV cache: the compiled CPU kernel, and the gather-based PyTorch reference
that tests and benchmarks hold it against.

The kernel (sidp/csrc/paged_attention.cpp) is compiled on first use and cached in
$SIDP_CACHE_DIR/torch_extensions (default ~/.cache/sidp/torch_extensions), so later processes only load it.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import torch

from sidp.errors import SidpError
from sidp.machine import cpu_features
from sidp.paths import cache_root

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "paged_attention.cpp"
_NAME = "sidp_paged_attention"
# TORCH_TARGET_VERSION 2.10 keeps the source to the stable ABI, which has had parallel_for since then.
_CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-DTORCH_TARGET_VERSION=0x020a000000000000"]

_load_lock = threading.Lock()
_op = None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new token per sequence over its context in the paged cache.

    q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] in q's dtype (fp32, bf16 or fp16);
    block_tables int32 [B, max_blocks]; context_lens int32 [B], each >= 1, counting the new token, whose
    K/V must already be in the cache. Query head h reads KV head h // (H // Hkv). Returns [B, H, D] in q's
    dtype; softmax and sums are done in float32.
    """
    # The kernel re-checks everything it relies on; these only make a wrong call read better.
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "bad q / cache rank"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q, k_cache and v_cache must share a dtype"
    assert block_tables.dtype == context_lens.dtype == torch.int32, "block_tables, context_lens must be int32"
    op = _op if _op is not None else _load()
    # q is small and may be a view into a fused QKV projection; the caches must already be contiguous.
    return op(q.contiguous(), k_cache, v_cache, block_tables, context_lens, scale)


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


def _load():
    global _op
    with _load_lock:
        if _op is None:
            _build_or_load(cache_root() / "torch_extensions" / f"paged_attention-{_cache_key()}")
            _op = torch.ops.sidp.paged_decode_attention.default
    return _op


def _build_or_load(build_dir: Path) -> None:
    library = build_dir / f"{_NAME}.so"
    # cpp_extension holds `lock` while it builds; without it, a present library is complete. Loading it
    # directly skips importing cpp_extension and running ninja, which a cached load would otherwise pay.
    if library.exists() and not (build_dir / "lock").exists():
        try:
            torch.ops.load_library(str(library))
        except OSError as e:
            raise SidpError(
                f"could not load the cached attention kernel {library} ({e}); "
                f"delete {build_dir} and run again to rebuild it"
            ) from e
        return
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 10):
        raise SidpError(f"sidp's CPU attention kernel needs torch >= 2.10 (found {torch.__version__})")
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension  # imports setuptools: only worth it when building

    try:
        cpp_extension.load(
            name=_NAME,
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
        )
    except (RuntimeError, OSError) as e:
        raise SidpError(
            "could not compile sidp's CPU attention kernel: it needs, at run time, a C++20 compiler "
            "(g++ >= 12 or clang, or the one $CXX names) and ninja (pip install ninja). "
            f"Build files: {build_dir}. Cause: {e}"
        ) from e


def _cache_key() -> str:
    # -march=native bakes the building CPU's instruction set into the library, so a cache shared between
    # machines (NFS home, copied image) must not hand it to a CPU without those instructions (SIGILL).
    parts = [" ".join(_CFLAGS), torch.__version__, cpu_features()]
    return hashlib.sha256(_SOURCE.read_bytes() + "\0".join(parts).encode()).hexdigest()[:16]
