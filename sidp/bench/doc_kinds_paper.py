"""Markdown tables of the like-for-like comparison `sidp plan --paper` writes (the `paper` entry of
docs/plan/paper-*.json): throughput by both models, what the group met at its owners, and how the 4K
ratio moves with kernels' speed at small batch."""

from __future__ import annotations

from sidp.bench.doc_kinds import Renderer, share, table, times
from sidp.bench.doc_kinds_plan import priced_as
from sidp.plan.paper import PAPER_4K

MODELS = {"1K": ("replica", "group"), "4K": ("replica", "group", "group_fixed_policy")}  # SiDP's, by input


def layout(doc: dict, entry: dict) -> list[str]:
    return [doc["paper"]["gpu"], entry["model"], str(entry["dp"]), str(entry["tp"])]


def tokens_per_s(run: dict, ratio: float | None = None, dp_fits: bool = True) -> str:
    """A run's output tokens/s per node, with its ratio over plain DP where plain DP fits."""
    if "output_tokens_per_s" not in run:
        return run.get("prediction_error", "-")
    speed = f"{run['output_tokens_per_s']:,.0f}"
    return f"{speed} ({times(ratio)})" if dp_fits else speed


def paper_throughput(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """Per model and layout: KV capacity of plain DP and SiDP, and output tokens/s at 1K and 4K inputs,
    SiDP by each replica alone, by the group on one clock, and by the group with its policy fixed."""
    rows = []
    for doc in docs:
        for e in doc["paper"]["results"]:
            dp, sidp = e["capacity"]["dp"], e["capacity"]["sidp"]
            fits = dp["fits"]
            kv = [f"{dp['kv_tokens_per_replica']:,}" if fits else "does not fit"]
            kv += [f"{sidp['kv_tokens_per_replica']:,}" if sidp["fits"] else "does not fit"]
            kv += [times(sidp["kv_tokens_per_replica"] / dp["kv_tokens_per_replica"]) if fits else "-"]
            cells = []
            for size, models in MODELS.items():
                runs = e[size]
                cells.append(tokens_per_s(runs["dp"], dp_fits=False) if fits else "-")
                cells += [tokens_per_s(runs.get(f"sidp_{m}", {}), runs[f"{m}_vs_dp"], fits) for m in models]
            rows.append([*layout(doc, e), *kv, *cells])
    head = (
        "GPU | model | DP | TP | KV tokens/replica, DP | SiDP | KV vs DP | 1K DP tok/s | 1K per replica | "
        "1K group | 4K DP tok/s | 4K per replica | 4K group | 4K group, policy fixed"
    )
    return "\n\n".join([table(head, rows, "llrr" + "r" * 10), published(docs), priced_as(docs)])


def published(docs: list[dict]) -> str:
    """The paper's own figures, as `sidp plan --paper` records them beside ours (each once)."""
    claims: dict[str, str] = {}
    for row in (r for d in docs for r in d["paper"]["rows"]):
        claims.setdefault(row["paper"], row["figure"])
    return "The paper's published figures: " + "; ".join(f"{f}: {p}" for p, f in claims.items()) + "."


def paper_group(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """The group model's CaS passes at the owners (requests fused per pass, share of GPU time serving)
    and its WaS/CaS step mix at 4K, beside the group with its policy fixed and each replica alone."""

    def met(run: dict) -> list[str]:
        g = run.get("group")
        if not g:
            return ["-", "-", "-"]
        return [f"{g['cas_passes']:,}", f"{g['requests_per_pass']:.2f}", share(g["serving_share"])]

    def mix(run: dict) -> str:
        modes = run.get("steps_by_mode")
        return f"{modes.get('was', 0):,}/{modes.get('cas', 0):,}" if modes else "-"

    rows = []
    for doc in docs:
        for e in doc["paper"]["results"]:
            k1, k4 = e["1K"], e["4K"]
            group, fixed = k4.get("sidp_group", {}), k4.get("sidp_group_fixed_policy", {})
            serving_fixed = met(fixed)[2]
            mixes = [mix(group), mix(fixed), mix(k4.get("sidp_replica", {}))]
            rows.append([*layout(doc, e), *met(k1.get("sidp_group", {})), *met(group), serving_fixed, *mixes])
    head = (
        "GPU | model | DP | TP | 1K passes | 1K req/pass | 1K serving | 4K passes | 4K req/pass | "
        "4K serving | 4K serving, policy fixed | 4K WaS/CaS steps: group | policy fixed | per replica"
    )
    return table(head, rows, "llrr" + "r" * 10)


def reaches(entry: dict) -> str:
    """Where the group model first reaches the paper's low end at 4K, as the tables print ratios."""

    def at_least(ratio: float | None) -> bool:
        return ratio is not None and round(ratio, 2) >= PAPER_4K

    if at_least(entry["4K"]["group_vs_dp"]):
        return "on the roofline"
    points = entry["4K_small_batch"]
    first = next((p for p in points if at_least(p["group_vs_dp"])), None)
    return f"H={first['half_speed_rows']}" if first else f"not up to H={points[-1]['half_speed_rows']}"


def paper_small_batch(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """SiDP over plain DP at 4K by both models, on the roofline and with kernels reaching rows / (rows + H)
    of its speed; and the H at which the group model first reaches the paper's low end."""
    halves = list(dict.fromkeys(h for d in docs for h in d["paper"]["half_speed_rows"]))
    rows, unfit = [], []
    for doc in docs:
        for e in doc["paper"]["results"]:
            if "4K_small_batch" not in e:  # no ratio without plain DP
                unfit.append(f"{e['model']} DP={e['dp']}/TP={e['tp']} on {doc['paper']['gpu']}")
                continue
            by_h = {p["half_speed_rows"]: p for p in e["4K_small_batch"]}
            points = [e["4K"], *(by_h.get(h, {}) for h in halves)]
            cells = [times(p.get(f"{m}_vs_dp")) for p in points for m in ("replica", "group")]
            rows.append([*layout(doc, e), *cells, reaches(e)])
    columns = [f"{where}: per replica | group" for where in ["roofline", *(f"H={h}" for h in halves)]]
    head = " | ".join(["GPU | model | DP | TP", *columns, f"group first at {PAPER_4K}x"])
    body = table(head, rows, "llrr" + "r" * (2 * len(columns) + 1))
    return body + (f"\n\nNo ratio where plain DP does not fit: {', '.join(unfit)}." if unfit else "")


KINDS: dict[str, Renderer] = {
    "plan-paper": paper_throughput,
    "plan-paper-group": paper_group,
    "plan-paper-small-batch": paper_small_batch,
}
