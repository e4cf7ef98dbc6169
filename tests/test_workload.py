"""Bench workloads: the SiDP paper's shapes scaled and seeded; JSONL prompts tokenized as the engine does."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from helpers import over_runtime

from sidp.bench.workload import (
    SHAPES,
    Request,
    build_workload,
    fixed_workload,
    jsonl_workload,
    random_workload,
)
from sidp.errors import SidpError
from sidp.llm import LLM
from sidp.model.checkpoint import load_tokenizer
from sidp.sampling_params import SamplingParams

SPECIAL = (0, 1, 2)


@pytest.mark.parametrize(
    "shape, scale, want_in, want_out",
    [
        ("summarization", 1.0, 1024, 256),
        ("code", 1.0, 2048, 256),
        ("conversation", 1.0, 4096, 256),
        ("summarization", 0.125, 128, 32),
        ("code", 0.125, 256, 32),
        ("conversation", 0.125, 512, 32),
        ("code", 0.01, 20, 3),  # 20.48 and 2.56 round to the nearest token
        ("conversation", 1e-6, 1, 1),  # never below one token
    ],
)
def test_fixed_shapes_have_the_papers_lengths_times_scale(shape, scale, want_in, want_out):
    reqs = fixed_workload(shape, 5, scale=scale, vocab_size=300, seed=0, avoid_ids=SPECIAL)
    assert len(reqs) == 5
    assert {len(r.prompt_token_ids) for r in reqs} == {want_in}
    assert {r.output_len for r in reqs} == {want_out}


def test_fixed_shapes_are_seeded_and_avoid_special_ids():
    a = fixed_workload("summarization", 4, scale=0.125, vocab_size=40, seed=7, avoid_ids=SPECIAL)
    assert fixed_workload("summarization", 4, scale=0.125, vocab_size=40, seed=7, avoid_ids=SPECIAL) == a
    assert fixed_workload("summarization", 4, scale=0.125, vocab_size=40, seed=8, avoid_ids=SPECIAL) != a
    assert {t for r in a for t in r.prompt_token_ids} == set(range(3, 40))  # 512 draws reach every id


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_fixed_shapes_reject_a_scale_that_is_not_positive(scale):
    with pytest.raises(SidpError, match="--scale"):
        fixed_workload("code", 2, scale=scale, vocab_size=100)


def _build(name, tokenizer=None, output_len=(2, 5), **kw):
    args = dict(scale=1.0, seed=0, tokenizer=tokenizer, vocab_size=300, avoid_ids=SPECIAL)
    return build_workload(name, 6, (4, 9), output_len, **{**args, **kw})


def test_build_random_is_the_random_workload_unchanged():
    w = _build("random", seed=3)
    assert w.requests == random_workload(6, (4, 9), (2, 5), vocab_size=300, seed=3, avoid_ids=SPECIAL)
    assert (w.name, w.input_len, w.output_len) == ("random", (4, 9), (2, 5))


def test_build_fixed_shape_reports_its_drawn_lengths():
    w = _build("code", scale=0.01)
    assert (w.name, w.scale, w.input_len, w.output_len) == ("code", 0.01, (20, 20), (3, 3))
    assert set(SHAPES) == {"summarization", "code", "conversation"}


def test_build_rejects_an_unknown_workload():
    with pytest.raises(SidpError, match="--workload 'chat'"):
        _build("chat")


@pytest.fixture
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model("llama"))


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_jsonl_tokenizes_like_generate_and_chat(tiny_model, tmp_path):
    path = _write(
        tmp_path,
        [json.dumps({"prompt": "plain text prompt", "max_tokens": 3}), "", json.dumps({"messages": CHAT})],
    )
    model = tiny_model("llama")
    reqs = jsonl_workload(path, load_tokenizer(model), (4, 4), seed=0)
    assert [r.output_len for r in reqs] == [3, 4]  # the line's max_tokens, else --output-len
    llm = LLM(model=model, dtype="float32", memory_per_replica=over_runtime("64MiB"))
    try:
        one = SamplingParams(temperature=0, max_tokens=1)
        [plain] = llm.generate("plain text prompt", one, use_tqdm=False)
        [chat] = llm.chat(CHAT, one, use_tqdm=False)
    finally:
        llm.close()
    assert reqs[0].prompt_token_ids == plain.prompt_token_ids
    assert reqs[1].prompt_token_ids == chat.prompt_token_ids
    # The chat template ran with add_generation_prompt=True, as `sidp generate` runs it.
    assert load_tokenizer(model).decode(reqs[1].prompt_token_ids).endswith("</s><assistant>")


def test_jsonl_draws_missing_lengths_from_the_range_by_seed(tokenizer, tmp_path):
    path = _write(tmp_path, [json.dumps({"prompt": f"prompt {i}"}) for i in range(40)])
    a = jsonl_workload(path, tokenizer, (2, 9), seed=1)
    assert jsonl_workload(path, tokenizer, (2, 9), seed=1) == a
    assert jsonl_workload(path, tokenizer, (2, 9), seed=2) != a
    assert {r.output_len for r in a} <= set(range(2, 10)) and len({r.output_len for r in a}) > 1


def test_the_embedded_prompts_are_a_jsonl_workload(tokenizer):
    path = resources.files("sidp").joinpath("data/prompts.jsonl")
    w = _build(str(path), tokenizer=tokenizer, output_len=(5, 5))
    assert len(w.requests) == 12 and w.output_len == (5, 5)
    assert all(isinstance(r, Request) and len(r.prompt_token_ids) > 10 for r in w.requests)


@pytest.mark.parametrize(
    "bad_line, words",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"text": "neither"}), "unknown field(s) text"),
        (json.dumps({"id": "a"}), 'exactly one of "prompt" or "messages"'),
        (json.dumps({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": "5"}), "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": True}), "max_tokens"),
        (json.dumps({"prompt": ""}), '"prompt" must be a non-empty string'),
        (json.dumps({"prompt": 5}), '"prompt" must be a non-empty string'),
        (json.dumps({"messages": 5}), '"messages" must be a non-empty list'),
    ],
)
def test_jsonl_names_the_file_and_line_of_a_bad_line(tokenizer, tmp_path, bad_line, words):
    good = json.dumps({"prompt": "fine"})
    path = _write(tmp_path, [good, "", good, bad_line, good])  # the blank line still counts
    with pytest.raises(SidpError) as error:
        jsonl_workload(path, tokenizer, (2, 2))
    assert f"{path} line 4" in str(error.value) and words in str(error.value)


def test_jsonl_messages_need_a_chat_template(tokenizer, tmp_path):
    tokenizer.chat_template = None
    path = _write(tmp_path, [json.dumps({"messages": CHAT})])
    with pytest.raises(SidpError, match="line 1: the model has no chat template"):
        jsonl_workload(path, tokenizer, (2, 2))


def test_jsonl_missing_file_is_a_user_error(tokenizer, tmp_path):
    with pytest.raises(SidpError, match="Cannot read the workload"):
        jsonl_workload(tmp_path / "nope.jsonl", tokenizer, (2, 2))
