"""Every mistake a user can make with the API ends in one SidpError that says what to do."""

from __future__ import annotations

import multiprocessing
import shutil

import pytest
from helpers import budget_for_blocks, over_runtime

from sidp import LLM, SamplingParams, SidpError
from sidp.memory import parse_bytes


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(
        tiny_model("qwen2"), dtype="float32", memory_per_replica=over_runtime("64MiB"), max_model_len=64
    )


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("x" * 64, "max_model_len=64"),
        ("", "empty"),
        ([1, 2, 100000], "outside the vocabulary"),
        (3.5, "neither"),
    ],
)
def test_bad_prompt_rejected_before_any_work(llm, prompt, message):
    steps = llm.engine.num_steps
    with pytest.raises(SidpError, match=message):
        llm.generate(["fine", prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine.num_steps == steps
    assert not llm.engine.has_work()


def test_params_count_must_match(llm):
    with pytest.raises(SidpError, match="one per prompt"):
        llm.generate(["a", "b"], [SamplingParams()] * 3, use_tqdm=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n=2), "n=2"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(SidpError, match=message):
        SamplingParams(**kwargs)


def test_budget_too_small_names_the_bytes(tiny_model):
    with pytest.raises(SidpError, match=r"give at least [0-9,]+ bytes"):
        LLM(tiny_model("llama"), dtype="float32", memory_per_replica="100KiB")


def test_max_model_len_beyond_kv_or_model(tiny_model):
    with pytest.raises(SidpError, match="more than the KV cache holds"):
        budget = budget_for_blocks(tiny_model("llama"), 10, max_model_len=1024)  # 160 tokens
        LLM(tiny_model("llama"), dtype="float32", memory_per_replica=budget, max_model_len=1024)
    with pytest.raises(SidpError, match="max_position_embeddings"):
        LLM(
            tiny_model("llama"), dtype="float32", memory_per_replica=over_runtime("64MiB"), max_model_len=4096
        )


def test_missing_model_and_bad_dtype(tiny_model, tmp_path):
    with pytest.raises(SidpError):
        LLM(tmp_path / "nowhere")
    with pytest.raises(SidpError, match="dtype"):
        LLM(tiny_model("llama"), dtype="int8", memory_per_replica=over_runtime("64MiB"))


@pytest.mark.parametrize(
    ("text", "value"),
    [("600MiB", 600 * 2**20), ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29), ("4096", 4096), (123, 123)],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_nonsense():
    with pytest.raises(SidpError, match="600MiB"):
        parse_bytes("lots")


def test_interrupted_generate_leaves_the_engine_clean(llm, monkeypatch):
    engine = llm.engine
    real_step, calls = engine.step, []

    def step_then_interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["abc", "defgh"], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    monkeypatch.undo()
    assert not engine.has_work()
    assert engine.scheduler.block_manager.num_free_blocks == len(engine.scheduler.block_manager.blocks)
    out = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 3


def test_a_tokenizer_that_cannot_load_stops_the_replicas_started_beside_it(tiny_model, tmp_path):
    """The tokenizer loads while a group's replicas start; when it fails, the group is stopped."""
    source = tiny_model("llama")
    for file in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(source / file, tmp_path / file)
    # the replicas' stop-string decoder reads tokenizer.json alone; transformers cannot use this class name
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": 5}')
    with pytest.raises(SidpError, match="Cannot load the tokenizer"):
        LLM(tmp_path, dtype="float32", memory_per_replica=over_runtime("64MiB"), data_parallel_size=2)
    assert multiprocessing.active_children() == []
