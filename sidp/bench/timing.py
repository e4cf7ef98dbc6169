"""Timing one call the way the benchmark scripts do: a warm-up call, then the median of repeated ones."""

from __future__ import annotations

import time


def median_ms(fn, *args, repeats: int = 20) -> float:
    """The median wall time of `fn(*args)` over `repeats` calls after one untimed call, in ms."""
    fn(*args)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3
