"""Markdown tables of benchmarks/vllm_plugin_bench.py's JSONs: each rank's worker memory and speed with
and without sidp's vLLM plugin, and the pooled linears' product against vLLM's own (sidp/bench/
doc_tables.py puts them between their markers)."""

from __future__ import annotations

from sidp.bench.doc_kinds import Renderer, table


def _mib(values: list[int]) -> str:
    return " / ".join(f"{v / 2**20:.0f}" for v in values)


def plugin(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    """A row per run (vLLM alone, with the plugin), compiled and eager: each rank's worker PSS at start,
    at its peak and after the run, and output tokens/s (each rank's, then both)."""
    rows = []
    for doc in docs:
        how = "torch.compile" if doc["torch_compile"] else "eager"
        for run, result in doc["results"].items():
            ranks = result["ranks"]
            rows.append(
                [
                    f"{'vLLM + sidp' if 'sidp' in run else 'vLLM'}, {how}",
                    _mib([r["pss_started_bytes"]["Worker"] for r in ranks]),
                    _mib([r["pss_peak_bytes"]["Worker"] for r in ranks]),
                    _mib([r["pss_settled_bytes"]["Worker"] for r in ranks]),
                    " / ".join(f"{r['output_tokens_per_s']:.1f}" for r in ranks)
                    + f" ({result['output_tokens_per_s']:.1f} both)",
                ]
            )
    head = "run | worker PSS at start, MiB (rank 0 / 1) | peak | after the run | output tokens/s"
    same = [
        f"{d['same_tokens']['identical']} of {d['same_tokens']['requests']} requests"
        f" ({'torch.compile' if d['torch_compile'] else 'eager'})"
        for d in docs
    ]
    freed = docs[0]["pss_saving_per_rank"][0]
    return "\n\n".join(
        [
            table(head, rows, "lrrrr"),
            f"The plugin frees {freed['freed_by_sidp_bytes'] / 2**20:.1f} MiB per rank, half of the "
            f"{freed['pooled_bytes'] / 2**20:.1f} MiB of MLP weights. Greedy tokens equal to vLLM's alone: "
            + "; ".join(same)
            + ".",
        ]
    )


def matmuls(paths: list[str], docs: list[dict], options: dict[str, str]) -> str:
    rows = [
        [
            m["matmul"].replace("_", "/"),
            str(m["rows"]),
            f"{m['vllm_onednn_ms']:.3f}",
            f"{m['torch_linear_ms']:.3f}",
            f"{m['torch_linear_shared_ms']:.3f}",
        ]
        for m in docs[0]["matmuls"]
    ]
    head = (
        "matmul | rows | vLLM's oneDNN (ms) | torch linear (ms) | torch linear, weight in shared memory (ms)"
    )
    return table(head, rows, "lrrrr")


KINDS: dict[str, Renderer] = {"vllm-plugin": plugin, "vllm-matmuls": matmuls}
