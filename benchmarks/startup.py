"""How long `sidp generate` takes on the embedded model, from the command to its exit, after a first run.

The first run converts the model, builds the kernels and measures the runtime's memory; it is not timed.
Each timed run sends one prompt for a few tokens, so the command is nearly all start-up and shutdown. Given
several source trees (--tree NAME=PATH: a checkout, e.g. a `git worktree` of an older commit), their runs
alternate, so that a busy moment of a shared host falls on both. The phases come from when each line of the
command's output arrives: the plan (the "starting N replicas" line), the results (the "requests:" line),
and the exit after them; CPU seconds are the command's and its replicas' user and system time.
  python benchmarks/startup.py [--runs N] [--tree NAME=PATH ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sidp.bench.report import write_script_report

PROMPT = "What is the capital of France?"
MARKS = {"plan_s": "starting ", "results_s": "requests: "}  # phase -> the start of the line that ends it


def timed_run(tree: Path, max_tokens: int) -> dict:
    """One `sidp generate` from `tree`'s sources: seconds to each mark, to the exit, and CPU seconds."""
    command = [sys.executable, "-m", "sidp.cli", "generate", "--prompt", PROMPT]
    command += ["--max-tokens", str(max_tokens)]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}  # and `-m` looks in cwd first
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        for phase, mark in MARKS.items():
            if phase not in run and mark in line:
                run[phase] = time.perf_counter() - start
    if proc.wait() != 0 or len(run) != len(MARKS):
        raise SystemExit(f"sidp generate from {tree} failed or printed no plan or results:\n{''.join(lines)}")
    run["wall_s"] = time.perf_counter() - start
    run["exit_s"] = run["wall_s"] - run["results_s"]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5, help="timed runs per tree (5)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--tree", action="append", help="NAME=PATH, repeatable (default: this checkout)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/startup.json"))
    args = parser.parse_args()
    args.loadavg = os.getloadavg()
    here = Path(__file__).resolve().parent.parent
    trees = dict(t.split("=", 1) for t in args.tree) if args.tree else {"this checkout": str(here)}
    for tree in trees.values():
        timed_run(Path(tree), args.max_tokens)  # the first run: builds what later runs find cached
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for i in range(args.runs):
        for name, tree in trees.items():
            runs[name].append(timed_run(Path(tree), args.max_tokens))
            print(f"{name:>16} run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[name][-1].items()))
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, m in medians.items():
        print(f"{name:>16} median: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
    tree_args = "".join(f" --tree '{name}={tree}'" for name, tree in trees.items()) if args.tree else ""
    command = f"python benchmarks/startup.py --runs {args.runs}{tree_args} --out {args.out}"
    report = {"prompt": PROMPT, "max_tokens": args.max_tokens, "runs": runs, "medians": medians}
    write_script_report("startup", args, report, command=command)


if __name__ == "__main__":
    main()
