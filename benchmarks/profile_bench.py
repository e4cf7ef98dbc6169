"""Where `sidp bench`'s time goes: the bench workload through one in-process replica under torch's profiler.

    python benchmarks/profile_bench.py --dtype bfloat16 --out docs/bench/profile-bf16.json

Self CPU time of every op, grouped: the model's matrix products (the projections and the LM head),
attention, normalisation and other elementwise math, copies, and what no op accounts for (Python, the
scheduler, sampling between ops). Shares are of the wall time of the timed `generate`, so the groups add
up to the engine's time. The profiler's own cost lands in "outside ops"; the throughput it prints is
therefore lower than `sidp bench`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sidp import LLM, SamplingParams
from sidp.bench.report import machine_info
from sidp.bench.workload import random_workload

MATMUL = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "mkldnn::_linear_pointwise"}
GROUPS = {  # first match wins; MATMUL is checked before these
    "attention": ("attention", "sdpa", "flash"),
    "copies and casts": ("copy", "to", "_to_copy", "index", "cat", "clone", "contiguous", "empty", "fill"),
    "elementwise": ("mul", "add", "sub", "div", "silu", "rsqrt", "pow", "mean", "neg", "exp", "norm"),
}


def group_of(name: str) -> str:
    if name in MATMUL:
        return "matrix products"
    short = name.split("::")[-1].lower()
    for group, words in GROUPS.items():
        if any(w in short for w in words):
            return group
    return "other ops"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench-results/profile.json"))
    args = parser.parse_args()
    loadavg = os.getloadavg()

    llm = LLM(dtype=args.dtype)
    # The same requests as `sidp bench` (its seeds; special and EOS ids left out of prompts).
    avoid = set(llm.tokenizer.all_special_ids) | set(llm.spec.eos_token_ids)
    vocab = llm.spec.vocab_size

    def generate(requests):
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
        return llm.generate(prompts, params, use_tqdm=False)

    generate(random_workload(4, output_len=(32, 32), vocab_size=vocab, seed=1, avoid_ids=avoid))
    requests = random_workload(args.num_requests, vocab_size=vocab, seed=0, avoid_ids=avoid)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        generate(requests)
        wall = time.perf_counter() - started
    llm.close()

    ops = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            ops[e.key] = {"self_s": e.self_cpu_time_total / 1e6, "calls": e.count}
    groups: dict[str, float] = {}
    for name, op in ops.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + op["self_s"]
    groups["outside ops (Python, scheduling, profiler)"] = wall - sum(groups.values())
    output_tokens = sum(r.output_len for r in requests)
    top = sorted(ops.items(), key=lambda kv: -kv[1]["self_s"])[:25]
    print(f"{len(requests)} requests, {output_tokens} output tokens in {wall:.1f} s under the profiler")
    for group, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<44} {seconds:7.2f} s  {100 * seconds / wall:5.1f}%")
    print("top ops (self time):")
    for name, op in top:
        print(
            f"  {name:<44} {op['self_s']:7.2f} s  {100 * op['self_s'] / wall:5.1f}%  {op['calls']:>8} calls"
        )
    report = {
        "command": f"python benchmarks/profile_bench.py --dtype {args.dtype} --num-requests "
        f"{args.num_requests} --out {args.out}",
        "dtype": args.dtype,
        "num_requests": len(requests),
        "wall_s": wall,
        "groups": {g: {"seconds": s, "share": s / wall} for g, s in groups.items()},
        "top_ops": [{"op": n, **op} for n, op in top],
        "machine": machine_info(loadavg),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
