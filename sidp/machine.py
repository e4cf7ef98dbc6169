"""Facts about the CPU this process runs on, read from /proc/cpuinfo where there is one."""

from __future__ import annotations

import functools
import platform


def cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of `keys`, or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_features() -> str:
    """The architecture and its sorted feature flags (x86 "flags", arm64 "Features")."""
    flags = cpuinfo("flags", "Features")
    if flags is None:
        return platform.machine() + ":" + platform.processor()
    return platform.machine() + ":" + " ".join(sorted(flags.split()))


BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides bf16 GEMM speed


def bf16_flags() -> dict[str, bool]:
    """Which of the x86 flags that make bf16 fast (or slow) this CPU has; all False off x86 Linux."""
    flags = cpu_flags()
    return {flag: flag in flags for flag in BF16_FLAGS}


def flags_text(flags: dict[str, bool]) -> str:
    """ "avx2 avx512f, no avx512_bf16 amx_tile amx_bf16": the missing ones say as much as the others."""
    have = " ".join(f for f, present in flags.items() if present)
    missing = " ".join(f for f, present in flags.items() if not present)
    return ", ".join(part for part in (have, missing and f"no {missing}") if part)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 "flags", arm64 "Features"); empty where /proc/cpuinfo is missing."""
    return frozenset((cpuinfo("flags", "Features") or "").split())


@functools.cache
def cpu_vendor() -> str:
    """The x86 vendor ("GenuineIntel", "AuthenticAMD"); empty off x86 Linux."""
    return cpuinfo("vendor_id") or ""
