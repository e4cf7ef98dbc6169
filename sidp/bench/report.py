"""What `sidp bench` prints and records beside its numbers: the comparison tables, the workload's
figures, and the machine the run was on (with its load, so a reader can see interference)."""

from __future__ import annotations

import argparse
import os
import platform

import torch

from sidp.bench.modes import modes_table, probes_table
from sidp.bench.workload import Workload, output_tokens, prompt_tokens
from sidp.machine import cpu_model


def print_side_by_side(
    args: argparse.Namespace, configs: list[str], results: list[dict], machine: dict
) -> None:
    print(f"\n{comparison_table(results)}\n\n{machine_line(machine)}")
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


def comparison_table(results: list[dict]) -> str:
    head = (
        f"{'engine':<14} {'batch size':>12} {'req/s':>8} {'total tok/s':>12} {'output tok/s':>13} "
        f"{'vs HF':>7}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        # sidp batches continuously, so its batch size is a ceiling, not a fixed shape.
        batch = f"<={r['max_num_seqs']}" if r["engine"] == "sidp" else str(r["batch_size"])
        ratio = f"{r['vs_transformers']:.2f}x" if r["vs_transformers"] is not None else "-"
        rows.append(
            f"{r['label']:<14} {batch:>12} {r['requests_per_s']:>8.2f} "
            f"{r['total_tokens_per_s']:>12.2f} {r['output_tokens_per_s']:>13.2f} {ratio:>7}"
        )
    return "\n".join(rows)


def machine_info(loadavg_before: tuple[float, float, float]) -> dict:
    import transformers

    return {
        "cpu": cpu_model(),
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
        f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}; "
        f"load average {m['loadavg_before'][0]:.2f} before, {m['loadavg'][0]:.2f} after"
    )
