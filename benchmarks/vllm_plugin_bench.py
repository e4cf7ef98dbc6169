"""vLLM's data parallelism with and without sidp's plugin: each rank's peak PSS and the output tokens/s.

Runs the same greedy workload as two ranks (one vLLM `LLM` each, on a core each, started by
`python -m sidp.vllm_plugin.launch`), first plain, then with the plugin pooling the MLPs, and writes what
each rank's processes held (PSS: shared pages count 1/k in each of k processes, so the pooled weights
count once over the group): at most during the run, and after it once the heap's free pages are handed
back (the peak moves by a hundred MiB or so with what glibc keeps of a step's scratch), and how fast the
ranks generated, timed from a common start. Run it with the python of the vLLM venv that has sidp
installed (`pip install --no-deps -e .`):

    $VLLM_PY benchmarks/vllm_plugin_bench.py --model DIR --out docs/bench/vllm-plugin-n2.json

`--matmuls` instead times, on one thread, what a pooled linear costs against vLLM's own: torch's linear on
the plain weight (private, or mapped from a peer as the plugin does) against vLLM's oneDNN product on the
weight it prepacks, for the model's MLP shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

KV_CACHE_GIB = "1"  # per rank, the same in both runs: vLLM's CPU build takes it as given
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # a rank asks its worker for sidp's summary
}
CONFIGS = {"vllm": False, "vllm+sidp": True}  # label -> plugin on
BARRIER_S = 900


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face folder")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=64, help="over all ranks")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eager", action="store_true", help="no torch.compile (a quicker start)")
    parser.add_argument("--matmuls", action="store_true", help="time the MLP matmuls alone (see above)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/vllm-plugin.json"))
    parser.add_argument("--as-rank", type=Path, help=argparse.SUPPRESS)  # internal: run one rank in FOLDER
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.as_rank:
        run_rank(args, args.as_rank)
        return
    from sidp.bench.report import machine_info, machine_line

    if args.matmuls:
        loadavg = os.getloadavg()
        report = {"command": command_line(), "machine": machine_info(loadavg), "matmuls": time_matmuls(args)}
        write(args.out, report)
        print(machine_line(report["machine"]))
        return

    for key, value in {**ENV, "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB}.items():
        os.environ.setdefault(key, value)
    loadavg = os.getloadavg()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="sidp-vllm-bench-") as tmp:
        for label, sidp in CONFIGS.items():
            runs[label] = run_config(args, Path(tmp, label), sidp)
    report = {
        "command": command_line(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(loadavg),
        "vllm": runs["vllm"]["ranks"][0]["vllm"],
        "model": args.model.replace(str(Path.home()), "~"),
        "dtype": args.dtype,
        "torch_compile": not args.eager,
        "kv_cache_gib_per_rank": int(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
        "workload": {
            k: getattr(args, k) for k in ("ranks", "num_requests", "input_len", "output_len", "seed")
        },
        "results": runs,
        "same_tokens": compare(runs["vllm"]["tokens"], runs["vllm+sidp"]["tokens"]),
        "pss_saving_per_rank": savings(runs),
    }
    for run in runs.values():
        del run["tokens"]
    write(args.out, report)
    print_report(report)
    print(machine_line(report["machine"]))


def command_line() -> str:
    words = ["python", "benchmarks/vllm_plugin_bench.py", *map(shlex.quote, sys.argv[1:])]
    return " ".join(words).replace(str(Path.home()), "~")


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def time_matmuls(args: argparse.Namespace, rows=(1, 8, 32, 128), repeats: int = 40) -> list[dict]:
    """Median ms of each MLP matmul: vLLM's oneDNN product, torch's linear on a private weight and on one
    in shared memory (sidp's CPU transport), one thread."""
    import torch
    import torch.nn.functional as F
    import vllm._custom_ops as ops

    from sidp.bench.timing import median_ms
    from sidp.pool.transport import CpuTransport

    torch.set_num_threads(1)
    config = json.loads(Path(args.model, "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    dtype = getattr(torch, args.dtype)
    out = []
    for name, (n, k) in {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}.items():
        weight = torch.randn(n, k, dtype=dtype)
        shared = CpuTransport().export(weight)
        handler = ops.create_onednn_mm(weight.t(), 32)
        for m in rows:
            x = torch.randn(m, k, dtype=dtype)
            row = {
                "matmul": name,
                "rows": m,
                "vllm_onednn_ms": median_ms(ops.onednn_mm, handler, x, None, repeats=repeats),
                "torch_linear_ms": median_ms(F.linear, x, weight, repeats=repeats),
                "torch_linear_shared_ms": median_ms(F.linear, x, shared, repeats=repeats),
            }
            print(
                "  ".join(
                    f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                    for key, value in row.items()
                )
            )
            out.append(row)
    return out


def run_config(args: argparse.Namespace, folder: Path, sidp: bool) -> dict:
    from sidp.vllm_plugin.launch import launch

    folder.mkdir(parents=True)
    command = [sys.executable, __file__, *sys.argv[1:], "--as-rank", str(folder)]
    status = launch(command, args.ranks, sidp=sidp)
    if status != 0:
        sys.exit(f"The {'sidp' if sidp else 'plain'} ranks failed with status {status}.")
    ranks = [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(args.ranks)]
    started, ended = min(r["started"] for r in ranks), max(r["ended"] for r in ranks)
    output_tokens = sum(r["output_tokens"] for r in ranks)
    tokens = [None] * args.num_requests
    for rank in ranks:
        for index, ids in zip(rank.pop("requests"), rank.pop("tokens"), strict=True):
            tokens[index] = ids
    return {
        "output_tokens": output_tokens,
        "elapsed_s": ended - started,
        "output_tokens_per_s": output_tokens / (ended - started),
        "ranks": ranks,
        "tokens": tokens,
    }


def compare(plain: list[list[int]], pooled: list[list[int]]) -> dict:
    """How many requests got the same greedy tokens, and where the others first differ."""
    first = [
        next(i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b)
        for x, y in zip(plain, pooled, strict=True)
        if x != y
    ]
    return {
        "requests": len(plain),
        "identical": len(plain) - len(first),
        "first_difference_at": sorted(first),
    }


def savings(runs: dict) -> list[dict]:
    """Per rank: how much less its worker and all its processes held at most with the plugin, beside the
    bytes the plugin freed (half the MLP bytes at two ranks)."""
    out = []
    for plain, pooled in zip(runs["vllm"]["ranks"], runs["vllm+sidp"]["ranks"], strict=True):
        out.append(
            {
                "rank": plain["rank"],
                "worker_bytes": plain["pss_peak_bytes"]["Worker"] - pooled["pss_peak_bytes"]["Worker"],
                "all_processes_bytes": plain["pss_peak_total_bytes"] - pooled["pss_peak_total_bytes"],
                "worker_settled_bytes": plain["pss_settled_bytes"]["Worker"]
                - pooled["pss_settled_bytes"]["Worker"],
                "freed_by_sidp_bytes": pooled["sidp"]["freed_bytes"],
                "pooled_bytes": pooled["sidp"]["pooled_bytes"],
            }
        )
    return out


def workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    return [
        [rng.randrange(100, vocab - 100) for _ in range(args.input_len)] for _ in range(args.num_requests)
    ]


def run_rank(args: argparse.Namespace, folder: Path) -> None:
    import vllm

    from sidp.bench.resident import PeakPss, pss_bytes
    from sidp.vllm_plugin import pool_summary, settings
    from sidp.vllm_plugin.offloader import return_free_memory

    rank, size = int(os.environ[settings.RANK]), int(os.environ[settings.SIZE])
    llm = vllm.LLM(
        model=args.model,
        dtype=args.dtype,
        enable_prefix_caching=False,
        max_model_len=args.input_len + args.output_len,
        seed=0,
        enforce_eager=args.eager,
    )
    prompts = workload(args, llm.get_tokenizer().vocab_size)
    mine = list(range(rank, len(prompts), size))
    # Both runs hand the heap's free pages back (the plugin does so after freeing the borrowed copies),
    # so that the difference is what sharing saves, not what glibc happened to keep.
    llm.apply_model(return_free_memory)
    processes = rank_processes(os.getpid())
    pss_started = {role: pss_bytes(pid) for role, pid in processes.items()}
    with PeakPss(list(processes.values())) as peaks:
        generate(llm, [prompts[i] for i in mine[:2]], 8)  # warm-up
        barrier(folder, rank, size)
        started = time.time()
        outputs = generate(llm, [prompts[i] for i in mine], args.output_len)
        ended = time.time()
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    llm.apply_model(return_free_memory)  # what the rank still holds once the step's scratch is given back
    pss_settled = {role: pss_bytes(pid) for role, pid in processes.items()}
    result = {
        "rank": rank,
        "vllm": vllm.__version__,
        "sidp": llm.apply_model(pool_summary)[0],
        "processes": {role: pid for role, pid in processes.items()},
        "pss_started_bytes": pss_started,
        "pss_peak_bytes": dict(zip(processes, peaks.pss, strict=True)),
        "pss_peak_total_bytes": sum(p or 0 for p in peaks.pss),
        "pss_settled_bytes": pss_settled,
        "started": started,
        "ended": ended,
        "output_tokens": sum(map(len, tokens)),
        "output_tokens_per_s": sum(map(len, tokens)) / (ended - started),
        "requests": mine,
        "tokens": tokens,
    }
    (folder / f"rank-{rank}.json").write_text(json.dumps(result), encoding="utf-8")


def generate(llm, prompts: list[list[int]], max_tokens: int) -> list:
    import vllm

    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)


def rank_processes(root: int) -> dict[str, int]:
    """This rank's processes by role: itself (the front end) and vLLM's engine core and worker, named by
    the titles vLLM gives them (multiprocessing's resource tracker holds next to nothing and is left out)."""
    found = {"frontend": root}
    parents = {root}
    while parents:
        parents = {pid for pid in _pids() if _parent(pid) in parents}
        for pid in parents:
            title = _cmdline(pid).strip()
            if title.startswith("VLLM::"):
                found[title.removeprefix("VLLM::")] = pid
            elif "resource_tracker" not in title:
                found[f"pid-{pid}"] = pid
    return found


def barrier(folder: Path, rank: int, size: int) -> None:
    """Wait until every rank is here, so that the ranks' timed runs start together."""
    (folder / f"ready-{rank}").touch()
    deadline = time.monotonic() + BARRIER_S
    while len(list(folder.glob("ready-*"))) < size:
        if time.monotonic() > deadline:
            sys.exit(f"rank {rank}: the other ranks did not get ready within {BARRIER_S} s")
        time.sleep(0.05)


def print_report(report: dict) -> None:
    mib = 2**20
    print(f"\n{'config':<10} {'rank':>4} {'worker PSS':>11} {'all PSS':>9} {'tok/s':>8}  (peak PSS in MiB)")
    for label, run in report["results"].items():
        for r in run["ranks"]:
            worker = (r["pss_peak_bytes"].get("Worker") or 0) / mib
            total = r["pss_peak_total_bytes"] / mib
            print(
                f"{label:<10} {r['rank']:>4} {worker:>11.1f} {total:>9.1f} {r['output_tokens_per_s']:>8.1f}"
            )
        print(f"{label:<10} {'all':>4} {'':>11} {'':>9} {run['output_tokens_per_s']:>8.1f}")
    for s in report["pss_saving_per_rank"]:
        print(
            f"rank {s['rank']}: peak PSS {s['worker_bytes'] / mib:.1f} MiB lower in the worker, "
            f"{s['all_processes_bytes'] / mib:.1f} MiB over its processes, "
            f"{s['worker_settled_bytes'] / mib:.1f} MiB in the worker after the run; sidp freed "
            f"{s['freed_by_sidp_bytes'] / mib:.1f} MiB (pooled: {s['pooled_bytes'] / mib:.1f} MiB)"
        )
    same = report["same_tokens"]
    print(
        f"the same greedy tokens with and without the plugin in {same['identical']} of {same['requests']} "
        f"requests; the others first differ at tokens {same['first_difference_at']}"
    )


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[1])


if __name__ == "__main__":
    main()
