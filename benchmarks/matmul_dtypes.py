"""How fast this CPU multiplies bf16 against float32, and what widening a bf16 weight costs.

Prints median milliseconds for F.linear on SmolLM2's gate/up shape (576 -> 3072) at several row counts:
float32, native bfloat16, and bf16 weights widened to float32 first (what sidp.model.linear does on CPUs
without bf16 instructions).  python benchmarks/matmul_dtypes.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def median_ms(fn, *args, repeats: int = 20) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    weight = torch.randn(3072, 576, dtype=torch.bfloat16)
    weight32 = weight.float()
    scratch = torch.empty_like(weight32)
    print(
        f"{'rows':>5} {'float32':>9} {'bfloat16':>9} {'widened':>9}  (ms, {torch.get_num_threads()} threads)"
    )
    for rows in (8, 64, 256):
        x = torch.randn(rows, 576, dtype=torch.bfloat16)
        x32 = x.float()
        fp32 = median_ms(F.linear, x32, weight32)
        bf16 = median_ms(F.linear, x, weight)
        widened = median_ms(lambda a: F.linear(a, scratch.copy_(weight)), x32)
        print(f"{rows:>5} {fp32:>9.2f} {bf16:>9.2f} {widened:>9.2f}")


if __name__ == "__main__":
    main()
