"""The embedded default model, SmolLM2-135M-Instruct, end to end (seconds, not milliseconds)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sidp import LLM, SamplingParams
from sidp.model import linear
from sidp.model.default_model import GGUF_FILE, default_model_path, embedded_gguf_path

pytestmark = pytest.mark.slow
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize(
    ("dtype", "native"),
    [("auto", True), ("auto", False), ("float16", True), ("float16", False), ("float32", True)],
)
def test_chat_knows_the_capital_of_france(monkeypatch, dtype, native):
    """Both ways of computing a 16-bit model (in its dtype, or widened to float32) run on any CPU."""
    monkeypatch.setattr(linear, "native_matmul", lambda d: native or d == torch.float32)
    llm = LLM(dtype=dtype, max_num_seqs=8, memory_per_replica="2GiB")
    assert llm.engine.runner.model.compute_dtype == (llm.engine.config.dtype if native else torch.float32)
    out = llm.chat(
        FRANCE,
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
    assert "requests: 12 ok, 0 already done, 0 failed" in run.stderr
    assert "starting 2 replicas" in run.stderr or len(os.sched_getaffinity(0)) < 2  # the default group


def test_gguf_read_directly_equals_its_converted_folder():
    """The same dequantized weights through both loaders give the same greedy tokens."""
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = [FRANCE, [{"role": "user", "content": "Write a haiku about the ocean."}]]
    outputs = []
    for model in (default_model_path(), embedded_gguf_path()):
        llm = LLM(model, dtype="float32", memory_per_replica="2GiB")
        outputs.append([o.outputs[0].token_ids for o in llm.chat(prompts, params, use_tqdm=False)])
    assert embedded_gguf_path().name == GGUF_FILE
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    ("sharing", "mode", "parts"),
    [
        ("none", "auto", "mlp"),
        ("sidp", "was", "mlp"),
        ("sidp", "cas", "mlp"),
        ("sidp", "auto", "mlp"),
        ("sidp", "map", "mlp"),
        ("sidp", "auto", "mlp,attn,embed"),
    ],
)
def test_two_replicas_know_the_capital_of_france(sharing, mode, parts):
    llm = LLM(
        data_parallel_size=2,
        weight_sharing=sharing,
        sidp_mode=mode,
        pooled_parts=parts,
        memory_per_replica="1GiB",
        max_num_seqs=8,
    )
    try:
        outs = llm.chat([FRANCE] * 3, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    finally:
        llm.close()
    assert all("Paris" in o.outputs[0].text for o in outs)
