"""`sidp bench --sweep memory`: the side-by-side configurations again at each of several memory budgets,
reported as a table and a two-panel PNG (throughput and KV room per replica against the budget)."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path

from sidp.errors import SidpError
from sidp.memory import parse_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sweep", choices=("memory",), help="run the configurations once per budget in --budgets"
    )
    parser.add_argument(
        "--budgets", help="with --sweep memory: memory per replica, comma-separated, like 400MiB,600MiB,1GiB"
    )
    parser.add_argument("--plot", type=Path, help="with --sweep: the PNG to draw (default: --out as .png)")


def sweep_budgets(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The budgets to sweep as (text as given, bytes), smallest first; [] without --sweep."""
    if not args.sweep:
        if args.budgets or args.plot:
            raise SidpError("--budgets and --plot belong to a sweep: add --sweep memory.")
        return []
    if args.memory_per_replica is not None:
        raise SidpError("--sweep memory takes its budgets from --budgets; drop --memory-per-replica.")
    texts = [t.strip() for t in (args.budgets or "").split(",") if t.strip()]
    if not texts:
        raise SidpError("--sweep memory needs --budgets, comma-separated sizes like 400MiB,600MiB,1GiB.")
    by_size = {parse_bytes(t): t for t in texts}  # "1GiB,1024MiB" is one budget, run once
    if min(by_size) < 1:
        raise SidpError(f"--budgets {args.budgets!r}: every budget must be more than 0 bytes.")
    if importlib.util.find_spec("matplotlib") is None:  # say so now, not after minutes of benchmarking
        raise SidpError(
            "--sweep draws its plot with matplotlib, which is missing: pip install 'sidp[bench]'."
        )
    return [(by_size[size], size) for size in sorted(by_size)]


def sweep_memory(budgets: list[tuple[str, int]], run_at: Callable[[str], list[dict]]) -> list[dict]:
    """run_at(budget) runs every configuration at that memory_per_replica; each result gains its budget."""
    points = [
        {"budget": text, "memory_per_replica": size, **result}
        for text, size in budgets
        for result in run_at(text)
    ]
    if not any(p["fits"] for p in points):
        # Nothing started anywhere: a wrong option rather than small budgets, or budgets all far too small.
        raise SidpError(f"No configuration could start at any budget; the first said: {points[0]['error']}")
    return points


def sweep_table(points: list[dict]) -> str:
    head = (
        f"{'budget':>10} {'config':<18} {'KV tok/replica':>15} {'vs DP':>6} {'output tok/s':>13} "
        f"{'vs DP':>6} {'vs HF':>6} {'preemptions':>12}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        if not p["fits"]:
            lines.append(f"{p['budget']:>10} {p['label']:<18} {'does not fit':>15}")
            continue
        # plain DP at the same budget, when it fits there: what SiDP's pooling bought
        dp = next(
            (q for q in points if q["label"] == "dp" and q["budget"] == p["budget"] and q["fits"]), None
        )
        kv_ratio = f"{p['kv_cache_tokens'] / dp['kv_cache_tokens']:.2f}x" if dp else "-"
        speed = f"{p['output_tokens_per_s'] / dp['output_tokens_per_s']:.2f}x" if dp else "-"
        hf = f"{p['vs_transformers']:.2f}x" if p.get("vs_transformers") is not None else "-"
        lines.append(
            f"{p['budget']:>10} {p['label']:<18} {p['kv_cache_tokens']:>15,} {kv_ratio:>6} "
            f"{p['output_tokens_per_s']:>13.2f} {speed:>6} {hf:>6} {p['num_preemptions']:>12}"
        )
    return "\n".join(lines)


def plot_sweep(points: list[dict], path: Path, title: str) -> None:
    """Output tokens/s and KV cache tokens per replica against the budget, one line per configuration; a
    configuration that does not fit at a budget has no point there."""
    # Imported here so matplotlib stays an optional extra; the Agg canvas draws without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    speed, room = fig.subplots(1, 2)
    labels = dict.fromkeys(p["label"] for p in points)
    for label, marker in zip(labels, "osD^vP*X", strict=False):  # markers tell apart lines that overlap
        fits = [p for p in points if p["label"] == label and p["fits"]]
        gib = [p["memory_per_replica"] / 2**30 for p in fits]
        speed.plot(gib, [p["output_tokens_per_s"] for p in fits], marker=marker, label=label)
        room.plot(gib, [p["kv_cache_tokens"] for p in fits], marker=marker, label=label)
    ticks = sorted({(p["memory_per_replica"], p["budget"]) for p in points})
    for ax, ylabel in ((speed, "output tokens/s"), (room, "KV cache tokens per replica")):
        ax.set_xticks([size / 2**30 for size, _ in ticks], [text for _, text in ticks])
        ax.set_xlabel("memory per replica")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=120)
    except OSError as error:
        raise SidpError(f"Cannot write the plot {path}: {error.strerror}.") from None
