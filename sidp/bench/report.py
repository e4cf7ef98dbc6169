"""What `sidp bench` prints and records beside its numbers: the comparison tables, the workload's
figures, and the machine the run was on (with its load, so a reader can see interference, and its bf16
instructions, which decide a bf16 figure more than any engine does)."""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from sidp.bench.modes import modes_table, probes_table
from sidp.bench.workload import Workload, output_tokens, prompt_tokens
from sidp.machine import bf16_flags, cpu_model, flags_text


def print_side_by_side(
    args: argparse.Namespace, configs: list[str], results: list[dict], machine: dict
) -> None:
    print(f"\n{comparison_table(results, args.peer)}\n\n{machine_line(machine)}")
    print(f"\n{memory_table([r for r in results if r['engine'] == 'sidp'])}")
    if len(configs) > 1:
        print(f"\nSiDP group of {args.dp}, pooling {args.pooled_parts}, budget {args.memory_per_replica}")
        print(modes_table([r for r in results if r["engine"] == "sidp"]))
    probed = next((r for r in results if r.get("probes")), None)
    if probed:
        print(f"\nprobed steps ({probed['label']}): the same step timed in both modes")
        print(probes_table(probed["probes"]))


def workload_stats(workload: Workload, seed: int, warmup_requests: int) -> dict:
    return {
        "name": workload.name,
        "scale": workload.scale,
        "num_requests": len(workload.requests),
        "input_len": list(workload.input_len),
        "output_len": list(workload.output_len),
        "seed": seed,
        "prompt_tokens": prompt_tokens(workload.requests),
        "output_tokens": output_tokens(workload.requests),
        "warmup_requests": warmup_requests,
    }


def add_ratios(results: list[dict], peer: str | None) -> None:
    """Each result's output tokens/s over transformers' and, with a peer, over the peer's."""
    _add_ratio(results, "vs_transformers", "transformers")
    if peer:
        _add_ratio(results, "vs_peer", peer)


def _add_ratio(results: list[dict], key: str, engine: str) -> None:
    """None where `engine` did not run or the configuration did not fit."""
    base = next((r["output_tokens_per_s"] for r in results if r["engine"] == engine), None)
    for r in results:
        r[key] = r["output_tokens_per_s"] / base if base and r.get("fits", True) else None


def comparison_table(results: list[dict], peer: str | None = None) -> str:
    """One row per engine run; with a peer, a column of ratios over it beside the one over transformers."""
    head = f"{'engine':<14} {'batch size':>12} {'req/s':>8} {'total tok/s':>12} {'output tok/s':>13}"
    if peer:
        head += f" {'vs ' + peer:>8}"
    head += f" {'vs HF':>7}"
    rows = [head, "-" * len(head)]
    for r in results:
        # sidp and vLLM batch continuously, so their batch size is a ceiling, not a fixed shape.
        batch = f"<={r['max_num_seqs']}" if "max_num_seqs" in r else str(r["batch_size"])
        row = (
            f"{r['label']:<14} {batch:>12} {r['requests_per_s']:>8.2f} "
            f"{r['total_tokens_per_s']:>12.2f} {r['output_tokens_per_s']:>13.2f}"
        )
        if peer:
            row += f" {_times(r['vs_peer']):>8}"
        rows.append(f"{row} {_times(r['vs_transformers']):>7}")
    return "\n".join(rows)


def memory_table(results: list[dict]) -> str:
    """Each sidp run's budget per replica beside the most its replica processes held (PSS, sampled)."""
    head = f"{'config':<18} {'budget':>11} {'peak PSS by replica':>30} {'PSS / budget':>13}"
    rows = [head, "-" * len(head)]
    for r in results:
        budgets, peaks = r["memory_per_replica_by_replica"], r["peak_pss_by_replica"]
        worst = max((p / b for p, b in zip(peaks, budgets, strict=True) if p is not None), default=None)
        held = ", ".join("-" if p is None else _mib(p) for p in peaks)
        rows.append(f"{r['label']:<18} {_mib(max(budgets)):>11} {held:>30} {_times(worst):>13}")
    return "\n".join(rows)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def machine_info(loadavg_before: tuple[float, float, float]) -> dict:
    import transformers

    return {
        "cpu": cpu_model(),
        "cpu_flags": bf16_flags(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        # Other work on the same cores skews the numbers; the load average lets a reader see it happened.
        "loadavg_before": list(loadavg_before),
        "loadavg": list(os.getloadavg()),
    }


def machine_line(m: dict) -> str:
    return (
        f"machine: {m['cpu']} ({flags_text(m['cpu_flags'])}), {m['cores']} cores, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}; "
        f"load average {m['loadavg_before'][0]:.2f} before, {m['loadavg'][0]:.2f} after"
    )


def script_args(name: str) -> argparse.Namespace:
    """--threads and --out of the microbenchmark benchmarks/NAME.py; sets torch's threads and keeps the load
    average from before the work (args.loadavg)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(f"bench-results/{name.replace('_', '-')}.json"))
    args = parser.parse_args()
    args.loadavg = os.getloadavg()
    torch.set_num_threads(args.threads)
    return args


def write_script_report(name: str, args: argparse.Namespace, report: dict, command: str = "") -> None:
    """Writes `report` to args.out after the command that makes it (by default benchmarks/NAME.py with
    the arguments of script_args) and its time, and before the machine."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    head = {
        "command": command or f"python benchmarks/{name}.py --threads {args.threads} --out {args.out}",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    whole = {**head, **report, "machine": machine_info(args.loadavg)}
    args.out.write_text(json.dumps(whole, indent=2) + "\n")
    print(f"wrote {args.out}")
