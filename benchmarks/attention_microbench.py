"""Decode attention at SmolLM2-135M's shapes: the paged kernel, which reads K/V in place, against the
reference, which gathers each sequence's blocks into a padded copy first. Prints a table and writes JSON.

    python benchmarks/attention_microbench.py --threads 2 --out bench-results/attention.json
    python benchmarks/attention_microbench.py --path avx512 --batch-sizes 1,8,64 --contexts 330 --no-reference

Each call reads one of --layers distinct caches in turn, as a decode step walks its layers, so K/V come
from memory rather than from a cache the previous call just warmed. A sequence's blocks are scattered
over the pool (--block-order shuffled, as after long churn) or consecutive (in-order, as a fresh cache
hands out a prompt's blocks); --layers 1 rereads one cache, which then stays in the CPU's caches.
--layout tiles times the kernel over the same values in the tiles layout (sidp/model/kv_cache.py: bf16 on
the amx path), the reference still over rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sidp.bench.report import machine_info
from sidp.bench.throughput import home_as_tilde
from sidp.machine import cpu_model
from sidp.model import cpu_kernels
from sidp.model.kv_cache import to_tiles
from sidp.model.paged_attention import paged_decode_attention_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=ints, default=[1, 8, 32, 64, 128])
    p.add_argument("--contexts", type=ints, default=[128, 330, 600], help="tokens per sequence")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["bf16", "fp32"])
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=30, help="distinct caches cycled through")
    p.add_argument("--block-order", choices=["shuffled", "in-order"], default="shuffled")
    p.add_argument("--layout", choices=["rows", "tiles"], default="rows", help="the kernel's cache layout")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (fewer past 3 s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--path", choices=cpu_kernels.supported_paths(), help="CPU path (default: the chosen one)")
    p.add_argument("--no-reference", action="store_true", help="time the kernel only")
    p.add_argument("--out", type=Path, default=Path("bench-results/attention.json"))
    return p.parse_args()


def make_case(args, batch: int, context: int, dtype: torch.dtype):
    """One pool of blocks for all layers, handed out shuffled or in order (--block-order)."""
    per_seq = -(-context // args.block_size)
    num_blocks = args.layers * batch * per_seq
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    k = torch.empty(shape, dtype=dtype).uniform_(-1, 1)
    v = torch.empty(shape, dtype=dtype).uniform_(-1, 1)
    ids = torch.randperm(num_blocks) if args.block_order == "shuffled" else torch.arange(num_blocks)
    order = ids.to(torch.int32).reshape(args.layers, batch, per_seq)
    q = torch.randn(batch, args.heads, args.head_dim).to(dtype)
    lens = torch.full((batch,), context, dtype=torch.int32)
    return q, k, v, list(order), lens


def time_calls(fn, case, scale: float, repeats: int) -> list[float]:
    q, k, v, tables, lens = case
    for layer in range(2):
        fn(q, k, v, tables[layer % len(tables)], lens, scale)
    times: list[float] = []
    budget_end = time.perf_counter() + 3.0
    for i in range(repeats):
        start = time.perf_counter()
        fn(q, k, v, tables[i % len(tables)], lens, scale)
        times.append(time.perf_counter() - start)
        if len(times) >= 5 and start > budget_end:
            break
    return times


def measure(args, kernel, name: str, batch: int, context: int) -> dict:
    case = make_case(args, batch, context, DTYPES[name])
    kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * case[1].element_size()
    row = {"dtype": name, "batch": batch, "context": context, "kv_bytes": kv_bytes}
    fns = {"kernel": kernel, "reference": paged_decode_attention_reference}
    if args.no_reference:
        del fns["reference"]
    cases = {"kernel": case, "reference": case}
    if args.layout == "tiles":
        q, k, v, tables, lens = case
        cases["kernel"] = (q, *to_tiles(k, v), tables, lens)
    for label, fn in fns.items():
        times = time_calls(fn, cases[label], args.head_dim**-0.5, args.repeats)
        median = statistics.median(times)
        row[f"{label}_ms"] = median * 1e3
        row[f"{label}_min_ms"] = min(times) * 1e3
        row[f"{label}_gbps"] = kv_bytes / median / 1e9
        row[f"{label}_calls"] = len(times)
    if "reference_ms" in row:
        row["speedup"] = row["reference_ms"] / row["kernel_ms"]
    return row


def first_call_seconds(kernel) -> float:
    """Compiling the kernel, or loading the cached build."""
    start = time.perf_counter()
    one = torch.ones(1, 1, 1, 16)
    kernel(one[0], one, one, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    loadavg_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = args.path or cpu_kernels.chosen_path()
    ops = cpu_kernels.ops(path)
    kernel = ops.paged_decode_attention if args.layout == "rows" else ops.paged_decode_attention_tiles
    first_call_s = first_call_seconds(ops.paged_decode_attention)
    print(f"path {path}")
    # Medians are the headline; minimums show what a call costs when nothing else wanted the CPU.
    header = "dtype    B  ctx   KV MB | kernel ms    min   GB/s |   ref ms     min   GB/s |    x"
    print(header + "\n" + "-" * len(header))
    rows = []
    for name in args.dtypes:
        for batch in args.batch_sizes:
            for context in args.contexts:
                r = measure(args, kernel, name, batch, context)
                rows.append(r)
                ref = [r.get(f"reference_{x}", float("nan")) for x in ("ms", "min_ms", "gbps")]
                print(
                    f"{name:5} {batch:4} {context:4} {r['kv_bytes'] / 1e6:7.2f} | {r['kernel_ms']:9.3f} "
                    f"{r['kernel_min_ms']:6.3f} {r['kernel_gbps']:6.1f} | {ref[0]:8.3f} "
                    f"{ref[1]:7.3f} {ref[2]:6.1f} | {r.get('speedup', float('nan')):4.1f}",
                    flush=True,
                )
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "path": path,
        "first_call_s": first_call_s,
        "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim},
        "block_size": args.block_size,
        "layers": args.layers,
        "block_order": args.block_order,
        "layout": args.layout,
        "note": "kv_bytes counts K and V rows the step must read; *_ms is the median call",
    }
    doc = {
        "command": " ".join(["python", *(home_as_tilde(a) for a in sys.argv)]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(loadavg_before),
        "meta": meta,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
