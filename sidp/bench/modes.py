"""The side-by-side part of `sidp bench --dp N`: which configurations run, what each replica reported,
and how auto's choices compare with both modes measured on the same steps (probes)."""

from __future__ import annotations

from sidp.errors import SidpError
from sidp.pool.placement import PARTS, parse_parts

CONFIGS = {  # label -> LLM arguments beside the shared engine options
    "dp": {"weight_sharing": "none"},
    "was": {"weight_sharing": "sidp", "sidp_mode": "was"},
    "cas": {"weight_sharing": "sidp", "sidp_mode": "cas"},
    "auto": {"weight_sharing": "sidp", "sidp_mode": "auto"},
    "map": {"weight_sharing": "sidp", "sidp_mode": "map"},  # the CPU default
}
SUMMED = (  # counters summed over a group's replicas
    *("steps", "preemptions", "steps_was", "steps_cas", "steps_map"),
    *("was_bytes_fetched", "was_wait_s", "cas_sent", "cas_wait_s", "cas_served", "cas_fused"),
)
BUCKETS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 255), (256, 1 << 30))  # step sizes in tokens
NEAR = 0.05  # a choice within 5% of the faster mode's time is within this machine's noise


def parse_configs(text: str) -> list[str]:
    """ "dp,map,auto:mlp+attn+embed": a SiDP mode may name its own pooled parts after a colon."""
    labels = [c.strip() for c in text.split(",") if c.strip()]
    for label in labels:
        config_arguments(label)
    if not labels:
        raise SidpError(f"--configs {text!r}: choose from {', '.join(CONFIGS)}, comma-separated.")
    return labels


def config_arguments(label: str) -> dict:
    """The LLM arguments of a configuration label, beside the shared engine options ("sidp": the run
    of a single engine, the options as given)."""
    if label == "sidp":
        return {}
    mode, _, parts = label.partition(":")
    if mode not in CONFIGS or (parts and mode == "dp"):
        raise SidpError(
            f"--configs: {label!r} is not a configuration; use {', '.join(CONFIGS)}, and for SiDP "
            "modes optionally :PARTS, like auto:mlp+attn+embed."
        )
    if not parts:
        return CONFIGS[mode]
    pooled = parse_parts(parts.replace("+", ","))
    return {**CONFIGS[mode], "pooled_parts": ",".join(p for p in PARTS if p in pooled)}


def totals(before: list[dict], after: list[dict]) -> dict:
    """The group's counters over the timed run: sums over replicas, warm-up subtracted."""
    earlier = {c["replica"]: c for c in before}
    out = dict.fromkeys(SUMMED, 0)
    for c in after:
        for key in SUMMED:
            out[key] += c.get(key, 0) - earlier.get(c["replica"], {}).get(key, 0)
    out["was_wait_s"] = round(out["was_wait_s"], 3)
    out["cas_wait_s"] = round(out["cas_wait_s"], 3)
    return out


def probe_summary(counters: list[dict]) -> dict:
    """Per step size: both modes' mean measured times, the faster one, and how often auto chose it."""
    samples = [p for c in counters for p in c.get("probes", [])]
    rows = []
    for low, high in BUCKETS:
        group = [p for p in samples if low <= p["tokens"] <= high]
        if not group:
            continue
        was = sum(p["was_s"] for p in group) / len(group)
        cas = sum(p["cas_s"] for p in group) / len(group)
        rows.append(
            {
                "tokens": f"{low}" if low == high else f"{low}-{high}" if high < 1 << 30 else f"{low}+",
                "samples": len(group),
                "was_ms": round(was * 1e3, 2),
                "cas_ms": round(cas * 1e3, 2),
                "faster": "cas" if cas < was else "was",
                "auto_chose_cas": sum(p["chosen"] == "cas" for p in group),
            }
        )
    strict = sum(p[f"{p['chosen']}_s"] <= min(p["was_s"], p["cas_s"]) for p in samples)
    near = sum(p[f"{p['chosen']}_s"] <= (1 + NEAR) * min(p["was_s"], p["cas_s"]) for p in samples)
    return {
        "samples": len(samples),
        "auto_matched_faster": strict / len(samples) if samples else None,
        "auto_within_5pct_of_faster": near / len(samples) if samples else None,
        "by_step_size": rows,
    }


def modes_table(results: list[dict]) -> str:
    head = (
        f"{'config':<18} {'KV tok/replica':>15} {'vs DP':>6} {'req/s':>7} {'output tok/s':>13} {'vs DP':>6} "
        f"{'steps was/cas/map':>18} {'WaS GB':>7} {'WaS wait s':>10} {'CaS sent':>9} {'fused':>6}"
    )
    dp = next((r for r in results if r["label"] == "dp"), None)
    lines = [head, "-" * len(head)]
    for r in results:
        c = r["counters"]
        kv_ratio = f"{r['kv_cache_tokens'] / dp['kv_cache_tokens']:.2f}x" if dp else "-"
        steps = f"{c['steps_was']}/{c['steps_cas']}/{c['steps_map']}"
        speed = f"{r['output_tokens_per_s'] / dp['output_tokens_per_s']:.2f}x" if dp else "-"
        lines.append(
            f"{r['label']:<18} {r['kv_cache_tokens']:>15,} {kv_ratio:>6} {r['requests_per_s']:>7.2f} "
            f"{r['output_tokens_per_s']:>13.2f} {speed:>6} {steps:>18} "
            f"{c['was_bytes_fetched'] / 1e9:>7.1f} {c['was_wait_s']:>10.2f} "
            f"{c['cas_sent']:>9} {c['cas_fused']:>6}"
        )
    return "\n".join(lines)


def probes_table(summary: dict) -> str:
    lines = [
        f"{'step tokens':>11} {'samples':>8} {'WaS ms':>8} {'CaS ms':>8} {'faster':>7} {'auto chose cas':>15}"
    ]
    for row in summary["by_step_size"]:
        lines.append(
            f"{row['tokens']:>11} {row['samples']:>8} {row['was_ms']:>8.2f} {row['cas_ms']:>8.2f} "
            f"{row['faster']:>7} {row['auto_chose_cas']:>15}"
        )
    if summary["samples"]:
        lines.append(
            f"auto chose the faster mode in {summary['auto_matched_faster']:.0%} of "
            f"{summary['samples']} probed steps "
            f"({summary['auto_within_5pct_of_faster']:.0%} within 5% of the faster)"
        )
    return "\n".join(lines)
