"""Markdown tables of the plans `sidp plan --json` writes (docs/plan/*.json): KV capacity, predicted
throughput and the WaS/CaS crossover, for the layouts that fill a node."""

from __future__ import annotations

from sidp.bench.doc_kinds import Renderer, table, times


def full_node(plan: dict) -> list[dict]:
    """The rows whose DP x TP uses every GPU the plan covers (a half-empty node is no comparison)."""
    most = max(r["dp"] * r["tp"] for r in plan["rows"])
    return [r for r in plan["rows"] if r["dp"] * r["tp"] == most]


def plain_dp(plan: dict, row: dict) -> dict | None:
    return next(
        (r for r in plan["rows"] if r["config"] == "dp" and (r["dp"], r["tp"]) == (row["dp"], row["tp"])),
        None,
    )


def priced_as(plans: list[dict]) -> str:
    """The device each plan priced its steps on: predicted, so no machine ran it."""
    devices = [p["device"] for p in plans]
    return "\n".join(
        f"Predicted, not measured: {d['name']} priced as {d['memory_bytes'] / 2**30:.2f} GiB, "
        f"{d['flops'] / 1e12:.1f} bf16 TFLOP/s, {d['mem_bw'] / 1e12:.2f} TB/s of HBM, "
        f"{d['link_bw'] / 1e9:.0f} GB/s peer copy, {d['round_trip_s'] * 1e6:.0f} µs CaS round trip, "
        f"{d['layer_overhead_s'] * 1e6:.0f} µs of launches per layer (`sidp/plan/hardware.py`)."
        for i, d in enumerate(devices)
        if d not in devices[:i]
    )


def plan_capacity(paths: list[str], plans: list[dict], options: dict[str, str]) -> str:
    """Memory per GPU and KV tokens per replica and node, plain DP beside each SiDP pooling option."""
    rows = []
    for plan in plans:
        for r in full_node(plan):
            layout = [plan["model"], str(r["dp"]), str(r["tp"]), r["config"]]
            if not r["fits"]:
                rows.append([*layout, "does not fit", "", "", "", ""])
                continue
            dp = plain_dp(plan, r)
            ratio = r["kv_tokens_per_replica"] / dp["kv_tokens_per_replica"] if dp and dp["fits"] else None
            rows.append(
                [
                    *layout,
                    f"{r['weight_gib_per_gpu']:.2f}",
                    f"{r['kv_tokens_per_replica']:,}",
                    times(ratio),
                    f"{r['kv_tokens_per_node']:,}",
                    f"{r['max_concurrency']:,}",
                ]
            )
    seqs = sorted({p["seq_len"] for p in plans})
    head = (
        "model | DP | TP | config | weights GiB/GPU | KV tokens / replica | vs DP | KV tokens / node | "
        f"{'/'.join(map(str, seqs))}-token seqs / node"
    )
    return table(head, rows, "lrrlrrrrr") + "\n\n" + priced_as(plans)


def plan_throughput(paths: list[str], plans: list[dict], options: dict[str, str]) -> str:
    """Predicted output tokens/s per node, a column per configuration, over plain DP where it fits."""
    configs = list(dict.fromkeys(r["config"] for p in plans for r in p["rows"]))
    rows = []
    for plan in plans:
        for layout in dict.fromkeys((r["dp"], r["tp"]) for r in full_node(plan)):
            cells = []
            for config in configs:
                r = next(
                    (r for r in plan["rows"] if (r["dp"], r["tp"], r["config"]) == (*layout, config)), None
                )
                if r is None or "output_tokens_per_s" not in r:
                    cells.append("does not fit" if r is not None and not r["fits"] else "-")
                    continue
                dp = plain_dp(plan, r)
                base = dp.get("output_tokens_per_s") if dp else None
                ratio = f" ({times(r['output_tokens_per_s'] / base)})" if base and r is not dp else ""
                cells.append(f"{r['output_tokens_per_s']:,.0f}{ratio}")
            rows.append([plan["model"], str(layout[0]), str(layout[1]), *cells])
    workloads = dict.fromkeys(
        f"Workload {w['shape']}: {w['input_len']:,} prompt + {w['output_len']:,} output tokens, "
        f"{w['requests_per_replica']} requests per replica{simulated(w)}."
        for w in (p["workload"] for p in plans)
        if w
    )
    body = table(" | ".join(["model", "DP", "TP", *configs]), rows, "lrr" + "r" * len(configs))
    return "\n".join([body, "", *workloads, priced_as(plans)])


def simulated(workload: dict) -> str:
    """Which of the planner's simulations priced the steps (plans from before it had two say nothing)."""
    return (
        f"; {workload['simulation']} simulation (`--simulation {workload['simulation']}`)"
        if "simulation" in workload
        else ""
    )


def plan_crossover(paths: list[str], plans: list[dict], options: dict[str, str]) -> str:
    """One borrowed MLP: the time to copy it (WaS) against the owner computing for the step (CaS), ms."""
    plan = plans[0]
    crossings = plan["crossover"]
    head = " | ".join(["tokens per step", *(f"{m} TP={c['tp']}" for c in crossings for m in ("WaS", "CaS"))])
    rows = [
        [f"{int(n):,}", *(f"{c['by_rows'][n][key]:.3f}" for c in crossings for key in ("was_ms", "cas_ms"))]
        for n in crossings[0]["by_rows"]
    ]
    ends = "; ".join(
        f"TP={c['tp']}: WaS as fast as CaS from {c['was_from_rows']:,} tokens per step"
        if c["was_from_rows"]
        else f"TP={c['tp']}: CaS faster at every step size"
        for c in crossings
    )
    body = table(head, rows, "r" * len(rows[0]))
    return f"{plan['model']}, MLP pooled:\n\n{body}\n\n{ends}.\n{priced_as(plans)}"


KINDS: dict[str, Renderer] = {
    "plan-capacity": plan_capacity,
    "plan-throughput": plan_throughput,
    "plan-crossover": plan_crossover,
}
