"""Our predictions beside the SiDP paper's published figures (arXiv 2605.28095, as quoted in
../shared/DESIGN.md and the issue): the paper's three models on H200 nodes at DP=8 and TP=2/DP=4."""

from __future__ import annotations

import argparse

from sidp.plan.capacity import Layout
from sidp.plan.hardware import Device
from sidp.plan.models import BUILT_IN, model_spec
from sidp.plan.report import plan_row

LAYOUTS = ((8, 1), (4, 2))  # (DP, TP) on an 8-GPU node
MLP = frozenset({"mlp"})  # the paper pools each layer's FFN


def compare(device: Device, requests_per_replica: int = 256) -> dict:
    """Per model and layout: plain DP and SiDP (MLP pooled), capacity and throughput at 1K and 4K inputs."""
    results = []
    for key in BUILT_IN:
        name, spec = model_spec(key)
        for dp, tp in LAYOUTS:
            entry = {"model": name, "dp": dp, "tp": tp}
            for shape in ("summarization", "conversation"):
                args = argparse.Namespace(
                    seq_len=4352, workload=shape, requests_per_replica=requests_per_replica
                )
                entry[shape] = {
                    "dp": plan_row(spec, device, Layout(dp, tp), args),
                    "sidp": plan_row(spec, device, Layout(dp, tp, MLP), args),
                }
            results.append(entry)
    return {"gpu": device.name, "results": results, "rows": _figures(results)}


def _ratio(entry: dict, shape: str, key: str) -> float | None:
    dp, sidp = entry[shape]["dp"], entry[shape]["sidp"]
    if key not in dp or key not in sidp or not dp[key]:
        return None
    return sidp[key] / dp[key]


def _figures(results: list[dict]) -> list[dict]:
    def each(fn, tp: int | None = None) -> str:
        chosen = [e for e in results if tp is None or e["tp"] == tp]
        return "; ".join(f"{e['model']} DP={e['dp']}/TP={e['tp']}: {fn(e)}" for e in chosen)

    def ratio(shape: str, key: str):
        return lambda e: "-" if _ratio(e, shape, key) is None else f"{_ratio(e, shape, key):.2f}x"

    def fits_70b(e: dict) -> str:
        dp, sidp = e["conversation"]["dp"], e["conversation"]["sidp"]
        state = "fits" if dp["fits"] else "does not fit"
        return f"DP {state}, SiDP {sidp['kv_tokens_per_node'] / 1e6:.2f}M KV tokens/node"

    seventy = [e for e in results if "7" in e["model"] and e["tp"] == 1]
    return [
        {
            "figure": "KV capacity over DP at TP=1/DP=8",
            "paper": "up to 1.8x",
            "ours": each(ratio("conversation", "kv_tokens_per_replica"), tp=1),
        },
        {
            "figure": "KV capacity over DP at TP=2/DP=4",
            "paper": "about 1.7x",
            "ours": each(ratio("conversation", "kv_tokens_per_replica"), tp=2),
        },
        {
            "figure": "70B models at TP=1/DP=8",
            "paper": "plain DP does not fit; SiDP about 1M KV tokens",
            "ours": "; ".join(f"{e['model']}: {fits_70b(e)}" for e in seventy),
        },
        {
            "figure": "throughput over DP, 1K inputs",
            "paper": "small gain",
            "ours": each(ratio("summarization", "output_tokens_per_s")),
        },
        {
            "figure": "throughput over DP, 4K inputs",
            "paper": "30-50% (up to 1.5x)",
            "ours": each(ratio("conversation", "output_tokens_per_s")),
        },
    ]


def paper_table(comparison: dict) -> str:
    lines = [f"The paper's figures beside sidp plan's predictions ({comparison['gpu']}, MLP pooled)"]
    for row in comparison["rows"]:
        lines.append(f"- {row['figure']}: paper {row['paper']}")
        lines.extend(f"    {part}" for part in row["ours"].split("; "))
    return "\n".join(lines)
