"""Every fault of tests/fault_cases.py, many times over: how long the group took to stop after each, and
what it left behind. Writes JSON (docs/reliability/fault-soak.json by default) and the table in
docs/RELIABILITY.md from it.

    python benchmarks/fault_soak.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import build_tiny_model  # noqa: E402
from fault_cases import CASES, run_case  # noqa: E402

from sidp.bench.doc_tables import rewrite  # noqa: E402
from sidp.machine import cpu_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each case")
    parser.add_argument("--cases", help="only the cases whose name holds this text")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs/reliability/fault-soak.json")
    parser.add_argument(
        "--doc", type=Path, default=HERE.parent / "docs/RELIABILITY.md", help="rewrites its table (none: no)"
    )
    args = parser.parse_args()
    names = [n for n in CASES if args.cases is None or args.cases in n]
    report = {
        "command": shlex.join(["python", "benchmarks/fault_soak.py", *sys.argv[1:]]),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "runs_per_case": args.runs,
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_model(Path(scratch) / "model", "llama", tied=False)
        for name in names:
            report["cases"].append(soak(name, args.runs, Path(scratch), model))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # as it goes: a cut run keeps its part
    failed = sum(c["runs"] - c["passed"] for c in report["cases"])
    print(f"{sum(c['passed'] for c in report['cases'])} passed, {failed} failed")
    print(f"wrote {args.out}")
    if str(args.doc) != "none":
        args.doc.write_text(rewrite(args.doc.read_text(), name=str(args.doc)))
        print(f"rewrote the table in {args.doc}")


def soak(name: str, runs: int, scratch: Path, model: Path) -> dict:
    stops, failures = [], []
    for run in range(runs):
        workdir = scratch / f"run-{run}"
        workdir.mkdir()
        started = time.monotonic()
        outcome = run_case(name, workdir, model)
        stops.append(outcome.stop_s)
        if outcome.left:
            failures.append({"run": run, "left": outcome.left, "stderr_tail": outcome.stderr_tail[-600:]})
        shutil.rmtree(workdir)
        verdict = "ok" if not outcome.left else outcome.left
        took = time.monotonic() - started
        print(f"  {name}: run {run + 1}/{runs} {verdict} (stopped in {outcome.stop_s:.2f} s; {took:.1f} s)")
    row = {
        "case": name,
        "runs": runs,
        "passed": runs - len(failures),
        "stop_s": {"min": min(stops), "median": statistics.median(stops), "max": max(stops)},
        "left_behind": sorted({item for f in failures for item in f["left"]}),
        "failures": failures,
    }
    spread = f"min {min(stops):.2f} median {statistics.median(stops):.2f} max {max(stops):.2f}"
    print(f"{name:<50} {row['passed']:>3}/{runs}  stopped in (s) {spread}", flush=True)
    return row


if __name__ == "__main__":
    main()
