"""Markdown tables of the JSONs benchmarks/*.py write: the profile, the attention kernel, matrix products by
dtype, on AMX tiles and in float32, the fault soak, start-up (sidp/bench/doc_tables.py puts them between their
markers)."""

from __future__ import annotations

from pathlib import Path

from sidp.bench.doc_kinds import PEERS, Renderer, name, share, table, times


def profile(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """benchmarks/profile_bench.py: each op group's share of the timed `generate`, a column per run."""
    groups = dict.fromkeys(
        g for d in docs for g in sorted(d["groups"], key=lambda g: -d["groups"][g]["seconds"])
    )
    rows = [["wall time of the timed `generate`", *(f"{d['wall_s']:.1f} s" for d in docs)]]
    for g in groups:
        rows.append([g, *(share(d["groups"][g]["share"]) if g in d["groups"] else "-" for d in docs)])
    head = " | ".join(["group", *(f"{d['dtype']} ({name(p)})" for p, d in zip(paths, docs, strict=True))])
    return table(head, rows, "l" + "r" * len(docs))


def profile_vs_peer(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """benchmarks/profile_bench.py --peer-python: sidp's op groups beside the peer's, seconds and share."""
    ours, theirs = docs[0], docs[0]["peer"]
    rows = [["wall time of the timed `generate`", f"{ours['wall_s']:.2f} s", f"{theirs['wall_s']:.2f} s"]]
    for g in sorted(ours["groups"], key=lambda g: -ours["groups"][g]["seconds"]):
        cells = [
            f"{x['groups'][g]['seconds']:.2f} s ({share(x['groups'][g]['share'])})"
            if g in x["groups"]
            else "-"
            for x in (ours, theirs)
        ]
        rows.append([g, *cells])
    head = f"group | sidp | {PEERS.get(theirs['engine'], theirs['engine'])} {theirs['version']}"
    return table(head, rows, "lrr")


def attention(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """benchmarks/attention_microbench.py: the paged decode kernel of each run (named by its JSON) and CPU
    path against the gather + bmm reference, with the K/V bytes it read per second, and where those came
    from: the cache's layout, how many layer caches the calls cycled through and the order of each
    sequence's blocks (runs before those options read rows, shuffled)."""
    rows = [
        [
            Path(path).stem,
            d["meta"]["path"],
            ", ".join(
                str(d["meta"].get(k, v))
                for k, v in (("layout", "rows"), ("layers", 30), ("block_order", "shuffled"))
            ),
            r["dtype"],
            str(r["batch"]),
            str(r["context"]),
            f"{r['kernel_ms']:.3f} ({r['kernel_min_ms']:.3f})",
            f"{r['kernel_gbps']:.1f}",
            f"{r['reference_ms']:.3f} ({r['reference_min_ms']:.3f})" if "reference_ms" in r else "-",
            times(r["speedup"]) if "reference_ms" in r else "-",
        ]
        for path, d in zip(paths, docs, strict=True)
        for r in d["results"]
    ]
    head = (
        "run | path | layout, caches, blocks | dtype | batch | context | kernel ms, median (best) | "
        "K/V GB/s (median) | gather + bmm reference ms, median (best) | speed-up (medians)"
    )
    return table(head, rows, "llllrrrrrr")


def matmul_dtypes(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """benchmarks/matmul_dtypes.py: median ms of F.linear on SmolLM2's gate/up shape, by dtype and path."""
    columns = ("float32", "bfloat16", "packed", "widened", "sidp")
    rows = [
        [str(r["rows"]), *("-" if r.get(c) is None else f"{r[c]:.2f}" for c in columns)]
        for r in docs[0]["rows"]
    ]
    return table(" | ".join(["rows", *columns]), rows, "r" * 6)


def runs(times: list[float]) -> str:
    """A benchmark's repeated runs of one figure, "1.23 / 1.25"."""
    return " / ".join(f"{t:.2f}" for t in times)


def matmul_amx(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """benchmarks/matmul_amx.py: a decode step's 30 layers of products, oneDNN against sidp's AMX kernel."""
    rows = [
        [
            str(r["rows"]),
            runs(r["onednn_ms"]),
            runs(r["sidp_ms"]),
            f"{r['ratio']:.2f}",
        ]
        for r in docs[0]["rows"]
    ]
    head = "rows | oneDNN, ms per step (two runs) | sidp, ms per step (two runs) | sidp / oneDNN (best each)"
    d, calls = docs[0], docs[0]["call_on_32x32"]
    floor = (
        f"Reading the step's weights once takes {d['read_ms']:.2f} ms; one row through a 32x32 packed weight "
        f"takes {calls['onednn_us']:.1f} us through oneDNN and {calls['sidp_us']:.1f} us through sidp.\n\n"
    )
    return floor + table(head, rows, "rrrr")


def matmul_float32(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """benchmarks/matmul_float32.py: a float32 decode step's products and LM head, MKL against oneDNN."""

    def ratio(r: dict, part: str) -> str:
        return f"{min(r[f'onednn_{part}_ms']) / min(r[f'mkl_{part}_ms']):.2f}"

    rows = [
        [
            str(r["rows"]),
            runs(r["mkl_step_ms"]),
            runs(r["onednn_step_ms"]),
            ratio(r, "step"),
            runs(r["mkl_head_ms"]),
            runs(r["onednn_head_ms"]),
            ratio(r, "head"),
        ]
        for r in docs[0]["rows"]
    ]
    head = (
        "rows | step: MKL, ms (two runs) | step: oneDNN, ms (two runs) | oneDNN / MKL | "
        "LM head: MKL, ms | LM head: oneDNN, ms | oneDNN / MKL"
    )
    return table(head, rows, "rrrrrrr")


def fault_soak(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """benchmarks/fault_soak.py: each fault case's runs, how long the group took to stop, what it left."""
    rows = [
        [
            c["case"],
            f"{c['passed']} of {c['runs']}",
            *(f"{c['stop_s'][k]:.2f}" for k in ("min", "median", "max")),
            "; ".join(c["left_behind"]) or "nothing",
        ]
        for c in docs[0]["cases"]
    ]
    head = "fault | runs passed | stopped in, s: min | median | max | left behind"
    return f"{docs[0]['runs_per_case']} runs of each case:\n\n" + table(head, rows, "lrrrrl")


def startup(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """benchmarks/startup.py: `sidp generate` of one prompt, each source tree's runs and their phases."""
    medians, phases = docs[0]["medians"], ("plan_s", "results_s", "exit_s", "wall_s", "cpu_s")
    rows = [
        [tree, runs([r["wall_s"] for r in rs]), *(f"{medians[tree][k]:.2f}" for k in phases)]
        for tree, rs in docs[0]["runs"].items()
    ]
    head = (
        "tree | whole command, s (each run) | median s: to the plan | to the results | exit after them | "
        "whole command | CPU s"
    )
    return table(head, rows, "lrrrrrr")


KINDS: dict[str, Renderer] = {
    "profile": profile,
    "profile-vs-peer": profile_vs_peer,
    "attention": attention,
    "matmul-dtypes": matmul_dtypes,
    "matmul-amx": matmul_amx,
    "matmul-float32": matmul_float32,
    "fault-soak": fault_soak,
    "startup": startup,
}
