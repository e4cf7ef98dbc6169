"""How fast this CPU multiplies bf16 against float32, and what widening a bf16 weight costs.

Prints median milliseconds for F.linear on SmolLM2's gate/up shape (576 -> 3072) at several row counts:
float32, native bfloat16, the bf16 weight widened to float32 whole and then multiplied, and
sidp.model.linear (which widens in L2-sized chunks, and narrows a single row to bf16 instead).
  python benchmarks/matmul_dtypes.py [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sidp.model.linear import linear


def median_ms(fn, *args, repeats: int = 20) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    torch.set_num_threads(parser.parse_args().threads)
    weight = torch.randn(3072, 576, dtype=torch.bfloat16)
    weight32 = weight.float()
    scratch = torch.empty_like(weight32)
    print(
        f"{'rows':>5} {'float32':>9} {'bfloat16':>9} {'widened':>9} {'sidp':>9}"
        f"  (ms, {torch.get_num_threads()} threads)"
    )
    for rows in (1, 2, 4, 8, 16, 64, 256):
        x = torch.randn(rows, 576, dtype=torch.bfloat16)
        x32 = x.float()
        fp32 = median_ms(F.linear, x32, weight32)
        bf16 = median_ms(F.linear, x, weight)
        widened = median_ms(lambda a: F.linear(a, scratch.copy_(weight)), x32)
        sidp = median_ms(linear, x32, weight)
        print(f"{rows:>5} {fp32:>9.2f} {bf16:>9.2f} {widened:>9.2f} {sidp:>9.2f}")


if __name__ == "__main__":
    main()
