"""Markdown tables of the JSONs `sidp bench` writes, one function per kind of table in the docs
(sidp/bench/doc_tables.py puts them between their markers), and the helpers the other kinds share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

WITHIN = 0.2  # the step-time error `sidp bench --predict` counts as a hit (sidp/plan/calibration.py)
PEERS = {"vllm": "vLLM"}


def table(head: str, rows: list[list[str]], align: str) -> str:
    """A markdown table of a head like "a | b" and rows of cells; `align` has an "l" or "r" per column."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [head.split(" | "), rule, *rows])


def times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def share(x: float) -> str:
    return f"{100 * x:.1f}%"


def name(path: str) -> str:
    return f"`{Path(path).name}`"


def only(results: list[dict], options: dict[str, str]) -> list[dict]:
    """The results whose label is in the `configs=a,b` option, if the marker gives one."""
    keep = options.get("configs")
    return results if keep is None else [r for r in results if r["label"] in keep.split(",")]


def kv_tokens(r: dict) -> str:
    by_replica = r.get("kv_cache_tokens_by_replica") or [r["kv_cache_tokens"]]
    return " / ".join(f"{n:,}" for n in dict.fromkeys(by_replica))


def speed(r: dict) -> str:
    """Output tokens/s; with several rounds, their mean and each round."""
    rounds = r.get("rounds_output_tokens_per_s", [])
    each = f" ({', '.join(f'{x:.2f}' for x in rounds)})" if len(rounds) > 1 else ""
    return f"{r['output_tokens_per_s']:.2f}{each}"


def utc(doc: dict) -> str:
    return doc["timestamp"][:16].replace("T", " ")


def sidp_results(doc: dict) -> list[dict]:
    return [r for r in doc["results"] if r["engine"] == "sidp"]


def plain_dp(results: list[dict], budget: str | None = None) -> dict | None:
    return next(
        (r for r in results if r["label"] == "dp" and r.get("fits", True) and r.get("budget") == budget), None
    )


def over(r: dict, base: dict | None, key: str) -> str:
    return times(r[key] / base[key]) if base else "-"


def engines(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """`sidp bench --peer`: one row per run, the peer and sidp (and transformers where it ran)."""
    peers = {(PEERS[r["engine"]], r["version"]) for d in docs for r in d["results"] if r["engine"] in PEERS}
    peer = " ".join(peers.pop()) if len(peers) == 1 else "peer"
    rows = []
    for path, doc in zip(paths, docs, strict=True):
        by = {r["engine"]: r for r in doc["results"]}
        theirs = next(r for r in doc["results"] if r["engine"] in PEERS)
        hf = by.get("transformers")
        rows.append(
            [
                name(path),
                doc["dtype"],
                utc(doc),
                f"{theirs['output_tokens_per_s']:.2f}",
                f"{by['sidp']['output_tokens_per_s']:.2f}",
                f"{hf['output_tokens_per_s']:.2f} (batch {hf['batch_size']})" if hf else "-",
                times(by["sidp"].get("vs_peer")),
                times(by["sidp"].get("vs_transformers")),
            ]
        )
    short = peer.split()[0]
    head = f"run (JSON) | dtype | UTC | {peer} | sidp | transformers | sidp / {short} | sidp / transformers"
    return "Output tokens/s:\n\n" + table(head, rows, "lllrrrrr")


def runs(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """Single-configuration `sidp bench` runs, one row each (which code ran: the JSONs' notes below)."""
    rows = [
        [name(p), utc(d), f"{sidp_results(d)[0]['output_tokens_per_s']:.2f}"]
        for p, d in zip(paths, docs, strict=True)
    ]
    return table("run (JSON) | UTC | output tok/s", rows, "llr")


def configs(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """`sidp bench --dp N`: each configuration beside plain DP, with the SiDP modes' counters."""
    several = len(docs) > 1
    rows = []
    for doc in docs:
        results = sidp_results(doc)
        dp = plain_dp(results)
        for r in only(results, options):
            c = r["counters"]
            rows.append(
                [
                    *([str(doc["config"]["dp"])] if several else []),
                    r["label"],
                    kv_tokens(r),
                    over(r, dp, "kv_cache_tokens"),
                    speed(r),
                    over(r, dp, "output_tokens_per_s"),
                    str(r["num_preemptions"]),
                    f"{c['steps_was']} / {c['steps_cas']} / {c['steps_map']}",
                    f"{c['was_bytes_fetched'] / 1e9:.1f}",
                    f"{c['cas_sent']:,} / {c['cas_served']:,} / {c['cas_fused']:,}",
                ]
            )
    head = (
        "config | KV tokens / replica | vs DP | output tok/s | vs DP | preemptions | steps WaS / CaS / map | "
        "WaS GB copied | CaS sent / served / fused"
    )
    return table("N | " * several + head, rows, "r" * several + "lrrrrrrrr")


def before_after(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """The same `sidp bench` command on two versions of the code: first JSON before, second after."""
    before = {r["label"]: r for r in sidp_results(docs[0])}
    rows = []
    for r in only(sidp_results(docs[1]), options):
        b = before.get(r["label"])
        rows.append(
            [
                r["label"],
                kv_tokens(b) if b else "-",
                kv_tokens(r),
                f"{b['output_tokens_per_s']:.2f}" if b else "-",
                f"{r['output_tokens_per_s']:.2f}",
                over(r, b, "output_tokens_per_s"),
            ]
        )
    head = (
        f"config | KV tokens / replica, before ({name(paths[0])}) | after | "
        f"output tok/s, before ({name(paths[0])}) | after ({name(paths[1])}) | after / before"
    )
    return table(head, rows, "lrrrrr")


def sweep(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """`sidp bench --sweep memory`: every configuration at every budget, beside plain DP at that budget."""
    doc = docs[0]
    results = sidp_results(doc)
    rows = []
    for r in only(results, options):
        if not r["fits"]:
            rows.append([r["budget"], r["label"], "does not fit", "", "", "", "", ""])
            continue
        dp = plain_dp(results, r["budget"])
        rows.append(
            [
                r["budget"],
                r["label"],
                kv_tokens(r),
                over(r, dp, "kv_cache_tokens"),
                speed(r),
                over(r, dp, "output_tokens_per_s"),
                times(r.get("vs_transformers")),
                str(r["num_preemptions"]),
            ]
        )
    head = (
        "budget | config | KV tokens / replica | vs DP | output tok/s | vs DP | vs transformers | preemptions"
    )
    out = table(head, rows, "llrrrrrr")
    hf = next((r for r in doc["results"] if r["engine"] == "transformers"), None)
    if hf:
        out += (
            f"\n\ntransformers (padded `generate`, batch {hf['batch_size']}): "
            f"{hf['output_tokens_per_s']:.2f} output tok/s on the same requests."
        )
    return out


def predict(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """`sidp bench --predict`: the planner's cost model against each measured configuration."""
    doc = docs[0]
    calibration = doc["calibration"]
    rows = []
    for c, r in zip(calibration["rows"], sidp_results(doc), strict=True):
        rows.append(
            [
                r.get("budget", "-"),
                c["label"],
                f"{c['measured_step_ms']:.2f}",
                f"{c['predicted_step_ms']:.2f}",
                f"{c['step_error']:+.0%}",
                f"{c['measured_elapsed_s']:.2f}",
                f"{c['predicted_elapsed_s']:.2f}",
                f"{c['elapsed_error']:+.0%}",
                str(c["measured_steps"]),
                str(c["predicted_steps"]),
            ]
        )
    head = "budget | config | step ms | predicted | error | elapsed s | predicted | error | steps | predicted"
    hits = sum(abs(c["step_error"]) <= WITHIN for c in calibration["rows"])
    n = len(calibration["rows"])
    d = calibration["device"]
    return "\n\n".join(
        [
            table(head, rows, "llrrrrrrrr"),
            f"Step time predicted within ±{WITHIN:.0%} for {hits} of {n} configurations ({hits / n:.0%}).",
            f"The device as measured before the runs ({d['name']}): {d['flops'] / 1e9:.1f} GFLOP/s, "
            f"{d['mem_bw'] / 1e9:.1f} GB/s streaming, {d['link_bw'] / 1e9:.1f} GB/s copy, "
            f"{d['round_trip_s'] * 1e6:.1f} µs round trip, "
            f"{d['layer_overhead_s'] * 1e6:.0f} µs per layer and step, "
            f"{d['seq_overhead_s'] * 1e6:.0f} µs per layer and sequence"
            + (
                f"; copies priced as {'overlapping' if d['copies_overlap'] else 'not overlapping'} compute."
                if "copies_overlap" in d
                else "."
            ),
        ]
    )


def memory(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """What each replica process held (peak PSS, sampled; VmHWM, the kernel's peak RSS) against its budget,
    a row per configuration of each JSON."""

    def mib(values: list[int | None]) -> str:
        return ", ".join("-" if v is None else f"{v / 2**20:.0f}" for v in values) + " MiB"

    rows = []
    for doc in docs:
        for r in only(sidp_results(doc), options):
            budgets, peaks = r["memory_per_replica_by_replica"], r["peak_pss_by_replica"]
            worst = max((p / b for p, b in zip(peaks, budgets, strict=True) if p is not None), default=None)
            rows.append(
                [
                    str(doc["config"]["dp"]),
                    r["label"],
                    f"{max(budgets) / 2**20:.0f} MiB",
                    kv_tokens(r),
                    str(r["num_preemptions"]),
                    mib(peaks),
                    times(worst),
                    mib(r.get("peak_rss_by_replica", [])),
                ]
            )
    head = (
        "N | config | budget | KV tokens / replica | preemptions | peak PSS by replica | PSS / budget "
        "| VmHWM by replica"
    )
    return table(head, rows, "rlrrrrrr")


Renderer = Callable[[list[str], list[dict], dict[str, str]], str]
KINDS: dict[str, Renderer] = {
    "engines": engines,
    "runs": runs,
    "configs": configs,
    "before-after": before_after,
    "sweep": sweep,
    "predict": predict,
    "memory": memory,
}
