"""The embedded default model, SmolLM2-135M-Instruct, end to end (seconds, not milliseconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidp import LLM, SamplingParams

pytestmark = pytest.mark.slow


def test_chat_knows_the_capital_of_france():
    llm = LLM(max_num_seqs=8, memory_per_replica="1GiB")
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )[0]
    assert "Paris" in out.outputs[0].text


def test_default_job_runs_end_to_end():
    run = subprocess.run(
        [sys.executable, "-m", "sidp.cli", "generate", "--max-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("### ") == 12
    assert "KV cache size:" in run.stderr
