"""sidp's compiled CPU kernels (sidp/csrc/*.cpp), built for the instruction set this CPU has best.

One library is compiled from every source on first use and cached in
$SIDP_CACHE_DIR/torch_extensions (default ~/.cache/sidp/torch_extensions), so later processes only
load it (about 50 ms). Each instruction-set path gets its own library and op namespace, so a test can
load a lower path beside the best one in the same process.

Paths, best first: `amx` (AMX tiles and AVX512-BF16: Sapphire Rapids on), `avx512_bf16` (Cooper Lake,
AMD Zen 4 on), `avx512` (Skylake-SP to Ice Lake), `avx2` (Haswell on, AMD Zen 1-3); `native` is the
building CPU's own set, for CPUs outside those (arm64). `SIDP_CPU_ISA=avx2` (or another path the CPU
has) forces one; the same path caps oneDNN's matrix products (ONEDNN_MAX_CPU_ISA), so one variable
picks the whole CPU path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path
from types import SimpleNamespace

import torch

from sidp.errors import SidpError
from sidp.machine import cpu_features, cpu_flags
from sidp.paths import cache_root

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.cpp"))

# path -> (the CPU flags it needs, the compiler's target, oneDNN's cap). gcc vectorises loops 256 bits
# wide on AVX-512 CPUs unless told otherwise; 512 made SiLU-and-multiply 1.6x faster here.
WIDE = " -mprefer-vector-width=512"
PATHS = {
    "amx": ({"amx_bf16", "amx_tile", "avx512_bf16"}, "-march=sapphirerapids" + WIDE, "AVX512_CORE_AMX"),
    "avx512_bf16": ({"avx512_bf16", "avx512bw", "avx512vl"}, "-march=cooperlake" + WIDE, "AVX512_CORE_BF16"),
    "avx512": ({"avx512f", "avx512bw", "avx512vl"}, "-march=skylake-avx512" + WIDE, "AVX512_CORE"),
    "avx2": ({"avx2", "fma"}, "-march=haswell", "AVX2"),
    "native": (set(), "-march=native", None),
}
# TORCH_TARGET_VERSION 2.10 keeps the sources to the stable ABI, which has had parallel_for since then.
# No FMA contraction: x*c + y*s rounds like PyTorch's op-by-op reference, so float32 results match it.
# No trapping math: nothing reads the floating-point exception flags, and without AVX-512's masks gcc
# vectorises no loop that selects between a float-to-int conversion and something else (SiLU's exp): on
# the avx2 path SiLU-and-multiply ran scalar, 5x slower than PyTorch's op-by-op SiLU and multiply.
_CFLAGS = [
    "-O3",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-fopenmp-simd",
    "-DTORCH_TARGET_VERSION=0x020a000000000000",
]

_lock = threading.Lock()
_loaded: dict[str, SimpleNamespace] = {}


def supported_paths() -> list[str]:
    """The paths this CPU can run, best first."""
    flags = cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["native"]
    return [name for name, (needs, _, _) in PATHS.items() if name != "native" and needs <= flags]


def chosen_path() -> str:
    """SIDP_CPU_ISA when set (refused if this CPU lacks it), else the best path this CPU has."""
    paths = supported_paths()
    forced = os.environ.get("SIDP_CPU_ISA")
    if forced:
        if forced not in PATHS:
            raise SidpError(f"SIDP_CPU_ISA={forced} is not a CPU path; choose one of {', '.join(PATHS)}.")
        if forced not in paths and forced != "native":
            raise SidpError(
                f"SIDP_CPU_ISA={forced}: this CPU lacks {', '.join(sorted(PATHS[forced][0] - cpu_flags()))}; "
                f"it runs {', '.join(paths)}."
            )
        return forced
    return paths[0] if paths else "native"


# oneDNN keeps a primitive, with its buffers, for every row count a product meets, 1024 by default: a
# long run of one replica grew 160 MiB past its budget that way (docs/BENCHMARKS.md). A step needs a
# handful (one per weight shape), and 64 ran as fast as the default.
ONEDNN_PRIMITIVES = "64"


def cap_onednn() -> None:
    """Bounds oneDNN's primitive cache, and with SIDP_CPU_ISA set, caps oneDNN at that path too (before
    its first use; what the user set wins). Without it, oneDNN keeps its own choice of instructions,
    which is the best path already."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVES)
    if os.environ.get("SIDP_CPU_ISA"):
        cap = PATHS[chosen_path()][2]
        if cap:
            os.environ.setdefault("ONEDNN_MAX_CPU_ISA", cap)


def ops(path: str | None = None) -> SimpleNamespace:
    """The kernels of `path` (default: the chosen path, looked up once per process: this runs for every
    op), as torch ops: paged_decode_attention, rms_norm, ..."""
    key = path or ""
    found = _loaded.get(key)
    if found is None:
        found = _loaded[key] = _load(path or chosen_path())
    return found


def _load(path: str) -> SimpleNamespace:
    with _lock:
        if path not in _loaded:
            namespace = f"sidp_{path}"
            _build_or_load(path, namespace)
            _loaded[path] = getattr(torch.ops, namespace)
    return _loaded[path]


def _flags(path: str, namespace: str) -> list[str]:
    return [*_CFLAGS, *PATHS[path][1].split(), f"-DSIDP_NS={namespace}"]


def _build_or_load(path: str, namespace: str) -> None:
    name = f"sidp_cpu_{path}"
    build_dir = cache_root() / "torch_extensions" / f"{name}-{_cache_key(path, namespace)}"
    library = build_dir / f"{name}.so"
    # cpp_extension holds `lock` while it builds; without it, a present library is complete. Loading it
    # directly skips importing cpp_extension and running ninja, which a cached load would otherwise pay.
    if library.exists() and not (build_dir / "lock").exists():
        try:
            torch.ops.load_library(str(library))
        except OSError as e:
            raise SidpError(
                f"could not load sidp's cached CPU kernels {library} ({e}); "
                f"delete {build_dir} and run again to rebuild them"
            ) from e
        return
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 10):
        raise SidpError(f"sidp's CPU kernels need torch >= 2.10 (found {torch.__version__})")
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension  # imports setuptools: only worth it when building

    try:
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in _SOURCES],
            extra_cflags=_flags(path, namespace),
            build_directory=str(build_dir),
            is_python_module=False,
        )
    except (RuntimeError, OSError) as e:
        raise SidpError(
            "could not compile sidp's CPU kernels: they need, at run time, a C++20 compiler "
            "(g++ >= 12 or clang, or the one $CXX names) and ninja (pip install ninja). "
            f"Build files: {build_dir}. Cause: {e}"
        ) from e


def _cache_key(path: str, namespace: str) -> str:
    # -march=native bakes the building CPU's instruction set into the library, so a cache shared between
    # machines (NFS home, copied image) must not hand it to a CPU without those instructions (SIGILL).
    machine = cpu_features() if path == "native" else platform.machine()
    parts = [" ".join(_flags(path, namespace)), torch.__version__, machine]
    sources = b"".join(f.name.encode() + f.read_bytes() for f in sorted(_CSRC.glob("*.[ch]*")))
    return hashlib.sha256(sources + "\0".join(parts).encode()).hexdigest()[:16]
