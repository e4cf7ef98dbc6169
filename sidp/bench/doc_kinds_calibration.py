"""The cost model scored out of sample: `sidp bench --predict --predict-device FIT.json` runs, each
configuration's predicted step time and mode mix beside the measured ones, in one table (sidp/bench/
doc_tables.py puts it between its markers; the fitted device comes from another run)."""

from __future__ import annotations

from sidp.bench.doc_kinds import Renderer, name, sidp_results, table

MODES = ("was", "cas", "map")


def mix(shares: dict[str, float]) -> str:
    """WaS / CaS / map shares of the steps that borrowed layers; "-" where none did."""
    return " / ".join(f"{100 * shares[m]:.0f}%" for m in MODES) if shares else "-"


def calibration(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    rows, scored = [], []
    for path, doc in zip(paths, docs, strict=True):
        replicas = doc["config"]["dp"]
        for c, r in zip(doc["calibration"]["rows"], sidp_results(doc), strict=True):
            scored.append(c)
            rows.append(
                [
                    name(path),
                    str(replicas),
                    r.get("budget") or doc["config"]["memory_per_replica"],
                    r["label"],
                    f"{c['measured_step_ms']:.2f}",
                    f"{c['predicted_step_ms']:.2f}",
                    f"{c['step_error']:+.0%}",
                    mix(c["measured_mode_shares"]),
                    mix(c["predicted_mode_shares"]),
                    f"{100 * c['fitted_share']:.0f}%",
                    "yes" if c["hit"] else "no",
                ]
            )
    head = (
        "run | N | budget | config | step ms | predicted | error | WaS / CaS / map steps | predicted "
        "| fitted | hit"
    )
    hits = sum(c["hit"] for c in scored)
    sources = sorted({d["calibration"]["device_source"] for d in docs})
    return "\n\n".join(
        [
            table(head, rows, "lrllrrrrrrl"),
            f"Hits (step time within 20% and each mode's share within 20 points): {hits} of {len(scored)} "
            f"configurations ({100 * hits / len(scored):.0f}%); the device: {', '.join(sources)}.",
        ]
    )


KINDS: dict[str, Renderer] = {"calibration": calibration}
