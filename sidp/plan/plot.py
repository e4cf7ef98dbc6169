"""The plan as a picture: KV tokens per node and predicted throughput against DP size, a line per config."""

from __future__ import annotations

from pathlib import Path


def plot_plan(plan: dict, path: Path) -> None:
    # Imported here so matplotlib stays an optional extra; the Agg canvas draws without a display and
    # without setting a global backend (as sidp.bench.sweep draws).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    kv_axes, speed_axes = figure.subplots(1, 2)
    for tp, config in sorted({(r["tp"], r["config"]) for r in plan["rows"]}):
        rows = [r for r in plan["rows"] if r["tp"] == tp and r["config"] == config and r["fits"]]
        label = f"{config}, TP={tp}"
        kv_axes.plot(
            [r["dp"] for r in rows], [r["kv_tokens_per_node"] / 1e6 for r in rows], "o-", label=label
        )
        rated = [r for r in rows if "output_tokens_per_s" in r]
        if rated:
            speed_axes.plot(
                [r["dp"] for r in rated], [r["output_tokens_per_s"] for r in rated], "o-", label=label
            )
    kv_axes.set(xlabel="DP size", ylabel="KV tokens per node (millions)", title="KV capacity")
    speed_axes.set(xlabel="DP size", ylabel="output tokens/s per node", title="Predicted throughput")
    kv_axes.legend(fontsize=7)
    figure.suptitle(f"{plan['model']} on {plan['gpu']} (predicted by sidp plan)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
