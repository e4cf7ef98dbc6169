"""Fixtures of the vLLM plugin tests: the models, and running vLLM processes (vLLM alone, vLLM with the
plugin installed but off, a SiDP group of two ranks) with their results and logs.

These tests run under the python of a venv with vLLM's CPU build and sidp installed without its
dependencies (see .ci/run); the sidp venv's `pytest` does not collect them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidp.model.default_model import DEFAULT_MODEL_NAME, DONE_FILE, FORMAT_VERSION
from sidp.paths import cache_root

ROOT = Path(__file__).resolve().parent.parent
STAGE_LIMIT_S = 300
TAIL_LINES = 40
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # rank_main sends a function to vLLM's worker
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class Run:
    """One vLLM run of tests_vllm/rank_main.py: its results (one per rank) and its log."""

    results: list[dict]
    log: str


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted SmolLM2 folder that sidp's tests use (made by the sidp venv, see .ci/run)."""
    folder = Path(
        os.environ.get("SIDP_SMOLLM2_DIR") or cache_root() / f"{DEFAULT_MODEL_NAME}-{FORMAT_VERSION}"
    )
    if not (folder / DONE_FILE).is_file():
        pytest.fail(
            f"No converted SmolLM2 at {folder}: run `.venv/bin/python -c 'from sidp.model.default_model "
            "import default_model_path as p; print(p())'` in the sidp venv, or set SIDP_SMOLLM2_DIR."
        )
    return folder


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3", tied=False, layers=4)


def write_prompts(folder: Path, prompts: list[list[int]]) -> Path:
    path = folder / "prompts.json"
    path.write_text(json.dumps(prompts), encoding="utf-8")
    return path


def rank_command(model: Path, prompts: Path, out: Path, max_tokens: int) -> list[str]:
    args = ["--model", str(model), "--prompts", str(prompts), "--max-tokens", str(max_tokens)]
    return [sys.executable, "-m", "tests_vllm.rank_main", *args, "--out", str(out / "result-{rank}.json")]


def run_stage(runs: dict[str, tuple[list[str], dict[str, str], Path]]) -> dict[str, Run]:
    """Start every (command, extra environment, folder) at once, wait for all, and read their results; a
    failure names the run and shows the end of its log."""
    procs = {}
    for name, (command, extra, folder) in runs.items():
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SIDP_VLLM_")}  # the run decides
        env = {**inherited, **VLLM_ENV, **extra}
        log = (folder / "log.txt").open("w", encoding="utf-8")
        procs[name] = (
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
            log,
        )
    deadline = time.monotonic() + STAGE_LIMIT_S
    try:
        for name, (proc, log) in procs.items():
            status = proc.wait(max(1.0, deadline - time.monotonic()))
            log.close()
            if status != 0:
                pytest.fail(f"{name} failed with status {status}:\n{_tail(runs[name][2] / 'log.txt')}")
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return {name: _read(folder) for name, (_, _, folder) in runs.items()}


def _read(folder: Path) -> Run:
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("result-*.json"))]
    return Run(results, (folder / "log.txt").read_text(encoding="utf-8"))


def _tail(path: Path) -> str:
    return "\n".join(path.read_text(encoding="utf-8").splitlines()[-TAIL_LINES:])
