"""`sidp plan`: for a model on a GPU node, memory and KV capacity per GPU, the WaS/CaS crossover, and
predicted throughput, plain DP beside each SiDP pooling option; tables, JSON, a PNG, the paper's figures."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

from sidp.bench.workload import SHAPE_OUTPUT_LEN, SHAPES, Request
from sidp.errors import SidpError
from sidp.plan.capacity import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, Capacity, Layout, capacity
from sidp.plan.group import simulate_group
from sidp.plan.hardware import Device, gpu, gpu_specs
from sidp.plan.models import BUILT_IN, model_spec
from sidp.plan.simulate import replica_step_times, simulate
from sidp.plan.step_time import StepTime
from sidp.pool.placement import parse_parts
from sidp.pool.policy import ROWS_GRID

POOLING = ("mlp", "mlp,attn", "mlp,attn,embed")
SIMULATIONS = {"group": simulate_group, "replica": simulate}
# The group with each replica's policy kept at its start-up calibration: what the policy's learning costs.
FIXED_POLICY = {"group_fixed_policy": partial(simulate_group, learn=False)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-32b", help=f"{', '.join(BUILT_IN)}, or a config.json")
    parser.add_argument("--gpu", default="H200", help=f"{', '.join(gpu_specs())}; figures below override")
    parser.add_argument("--memory-gib", type=float)
    parser.add_argument("--hbm-tb-s", type=float)
    parser.add_argument("--bf16-tflops", type=float)
    parser.add_argument("--nvlink-gb-s", type=float, help="bidirectional, as datasheets quote it")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--dp", default="2,4,8", help="DP sizes, comma-separated, 2..8")
    parser.add_argument("--tp", default="1,2", help="TP sizes, comma-separated")
    parser.add_argument("--pooling", default=";".join(POOLING), help="SiDP pooling options, ';'-separated")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=SHAPES["conversation"] + SHAPE_OUTPUT_LEN,
        help="for maximum concurrency",
    )
    parser.add_argument(
        "--workload",
        default="conversation",
        choices=[*SHAPES, "none"],
        help="predict throughput on this fixed shape (none: capacity only)",
    )
    parser.add_argument("--requests-per-replica", type=int, default=128)
    parser.add_argument(
        "--simulation",
        default="group",
        choices=list(SIMULATIONS),
        help="group: the replicas on one clock, meeting at their owners (CaS queues, shared links); "
        "replica: each alone, borrowed layers priced by the pool's cost model",
    )
    parser.add_argument("--json", type=Path, help="write the whole plan here")
    parser.add_argument("--plot", type=Path, help="PNG of KV tokens and throughput against DP size")
    parser.add_argument(
        "--paper", action="store_true", help="also set the paper's three models beside its published figures"
    )


def run(args: argparse.Namespace) -> dict:
    name, spec = model_spec(args.model)
    device = gpu(
        None if args.gpu.lower() == "custom" else args.gpu.upper(),
        memory_gib=args.memory_gib,
        hbm_tb_s=args.hbm_tb_s,
        bf16_tflops=args.bf16_tflops,
        nvlink_gb_s=args.nvlink_gb_s,
    )
    dps, tps = _sizes(args.dp, "--dp"), _sizes(args.tp, "--tp")
    poolings = [parse_parts(p) for p in args.pooling.split(";") if p.strip()]
    rows = []
    for tp in tps:
        for dp in dps:
            if dp * tp > args.gpus_per_node:
                continue
            for parts in [frozenset(), *poolings]:
                rows.append(plan_row(spec, device, Layout(dp, tp, parts), args))
    from sidp.bench.throughput import home_as_tilde

    plan = {
        "command": " ".join(["sidp", *(home_as_tilde(a) for a in sys.argv[1:])]),
        "model": name,
        "gpu": device.name,
        "device": asdict(device),
        "seq_len": args.seq_len,
        "workload": None
        if args.workload == "none"
        else {
            "shape": args.workload,
            "input_len": SHAPES.get(args.workload),
            "output_len": SHAPE_OUTPUT_LEN,
            "requests_per_replica": args.requests_per_replica,
            "simulation": args.simulation,
        },
        "rows": rows,
        "crossover": [_crossover(spec, device, tp) for tp in tps],
    }
    print(f"{name} on {device.name} nodes ({args.gpus_per_node} GPUs), bf16\n")
    print(capacity_table(plan))
    print(f"\n{crossover_table(plan)}")
    if plan["workload"]:
        print(f"\n{throughput_table(plan)}")
    if args.paper:
        from sidp.plan.paper import compare, paper_table

        plan["paper"] = compare(device, args.requests_per_replica)
        print(f"\n{paper_table(plan['paper'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        from sidp.plan.plot import plot_plan

        plot_plan(plan, args.plot)
        print(f"wrote {args.plot}")
    return plan


def _sizes(text: str, option: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise SidpError(f"{option} {text!r} should be positive integers with commas, like 2,4,8.")
    return sizes


def plan_row(spec, device: Device, layout: Layout, args) -> dict:
    cap = capacity(spec, device, layout)
    row = {
        "dp": layout.dp,
        "tp": layout.tp,
        "config": layout.label,
        "fits": cap.fits,
        "weight_gib_per_gpu": round(cap.weight_bytes_per_gpu / 2**30, 2),
        "kv_tokens_per_replica": cap.kv_tokens_per_replica,
        "kv_tokens_per_node": cap.kv_tokens_per_node,
        "max_concurrency": cap.concurrency(args.seq_len),
    }
    if cap.fits and args.workload != "none":
        row.update(predict(spec, device, cap, args.workload, args.requests_per_replica, args.simulation))
    return row


def predict(
    spec, device: Device, cap: Capacity, shape: str, requests_per_replica: int, simulation: str = "group"
) -> dict:
    """Throughput of `cap`'s layout on `requests_per_replica` requests of a workload shape per replica."""
    n = requests_per_replica * cap.layout.dp
    requests = [Request([0] * SHAPES[shape], SHAPE_OUTPUT_LEN) for _ in range(n)]
    step_times = replica_step_times(spec, device, cap)
    try:
        simulate_ = {**SIMULATIONS, **FIXED_POLICY}[simulation]
        p = simulate_(spec, cap, step_times, requests, MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS)
    except SidpError as error:
        return {"prediction_error": str(error)}
    predicted = {
        "output_tokens_per_s": round(p.output_tokens_per_s, 1),
        "steps": p.steps,
        "preemptions": p.preemptions,
        "steps_by_mode": p.modes,
    }
    if p.group and p.group["cas_passes"]:
        predicted["group"] = p.group
    return predicted


def _crossover(spec, device: Device, tp: int) -> dict:
    """Per remote layer (MLP pooled), WaS against CaS by step size, and the smallest size where WaS wins."""
    policy = StepTime(spec, device, tp, frozenset({"mlp"}), remote_layers=1).policy
    costs = {rows: policy.costs(rows) for rows in ROWS_GRID}
    crossover = next((r for r, c in costs.items() if c["was"] <= c["cas"]), None)
    return {
        "tp": tp,
        "copy_ms": round(policy.calibration.copy_s * 1e3, 3),
        "by_rows": {
            r: {"was_ms": round(c["was"] * 1e3, 3), "cas_ms": round(c["cas"] * 1e3, 3)}
            for r, c in costs.items()
        },
        "was_from_rows": crossover,
    }


def capacity_table(plan: dict) -> str:
    seqs = f"seqs of {plan['seq_len']}/node"
    head = (
        f"{'DP':>3} {'TP':>3} {'config':<20} {'weights GiB/GPU':>16} {'KV tok/replica':>15} "
        f"{'vs DP':>6} {'KV tok/node':>12} {seqs:>20}"
    )
    lines = ["Memory per GPU and KV capacity", head, "-" * len(head)]
    for r in plan["rows"]:
        base = _dp_row(plan, r)
        if not r["fits"]:
            lines.append(f"{r['dp']:>3} {r['tp']:>3} {r['config']:<20} {'does not fit':>16}")
            continue
        ratio = (
            f"{r['kv_tokens_per_replica'] / base['kv_tokens_per_replica']:.2f}x"
            if base and base["fits"]
            else "-"
        )
        lines.append(
            f"{r['dp']:>3} {r['tp']:>3} {r['config']:<20} {r['weight_gib_per_gpu']:>16.2f} "
            f"{r['kv_tokens_per_replica']:>15,} {ratio:>6} {r['kv_tokens_per_node']:>12,} "
            f"{r['max_concurrency']:>20,}"
        )
    return "\n".join(lines)


def crossover_table(plan: dict) -> str:
    crossings = plan["crossover"]
    lines = ["Per remote layer (MLP pooled), ms: WaS (copy under compute) against CaS (owner computes)"]
    names = [(f"WaS TP={c['tp']}", f"CaS TP={c['tp']}") for c in crossings]
    lines.append(f"{'rows':>6}" + "".join(f"{was:>11}{cas:>11}" for was, cas in names))
    for rows in ROWS_GRID:
        cells = (c["by_rows"][rows] for c in crossings)
        lines.append(f"{rows:>6}" + "".join(f"{v['was_ms']:>11.3f}{v['cas_ms']:>11.3f}" for v in cells))
    for c in crossings:
        lines.append(f"TP={c['tp']}: WaS as fast as CaS from {c['was_from_rows']} tokens per step")
    return "\n".join(lines)


def throughput_table(plan: dict) -> str:
    w = plan["workload"]
    head = f"{'DP':>3} {'TP':>3} {'config':<20} {'output tok/s/node':>18} {'vs DP':>6} {'steps WaS/CaS':>14}"
    lines = [
        f"Predicted throughput, {w['shape']} ({w['input_len']} in, {w['output_len']} out, "
        f"{w['requests_per_replica']} requests per replica, {w['simulation']} simulation)",
        head,
        "-" * len(head),
    ]
    for r in plan["rows"]:
        if "output_tokens_per_s" not in r:
            lines.append(
                f"{r['dp']:>3} {r['tp']:>3} {r['config']:<20} {r.get('prediction_error', 'does not fit'):>18}"
            )
            continue
        base = _dp_row(plan, r)
        ratio = (
            f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x"
            if base and "output_tokens_per_s" in base
            else "-"
        )
        modes = r["steps_by_mode"]
        steps = f"{modes.get('was', 0)}/{modes.get('cas', 0)}" if modes else "-"
        lines.append(
            f"{r['dp']:>3} {r['tp']:>3} {r['config']:<20} {r['output_tokens_per_s']:>18,.0f} "
            f"{ratio:>6} {steps:>14}"
        )
    return "\n".join(lines)


def _dp_row(plan: dict, row: dict) -> dict | None:
    return next(
        (r for r in plan["rows"] if r["config"] == "dp" and r["dp"] == row["dp"] and r["tp"] == row["tp"]),
        None,
    )
