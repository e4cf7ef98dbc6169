"""Sampling: seeded draws are reproducible whatever the batch; stop conditions end requests as vLLM does."""

from __future__ import annotations

import pytest
from helpers import over_runtime, random_prompts

from sidp import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(
        tiny_model("llama"),
        dtype="float32",
        memory_per_replica=over_runtime("64MiB"),
        max_num_batched_tokens=64,
    )


def ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_seed_reproducible_across_batch_mixes(llm):
    target = random_prompts([21], seed=11)[0]
    others = random_prompts([7, 50, 30, 2], seed=12)
    seeded = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    noise = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    alone = ids(llm.generate([target], seeded, use_tqdm=False))[0]
    mixed = llm.generate(
        [others[0], target, *others[1:]], [noise, seeded, noise, noise, noise], use_tqdm=False
    )
    reversed_mix = llm.generate([*others[::-1], target], [noise] * 4 + [seeded], use_tqdm=False)
    assert ids(mixed)[1] == alone
    assert ids(reversed_mix)[-1] == alone


def test_different_seeds_differ_and_sampling_is_not_greedy(llm):
    prompt = random_prompts([10], seed=5)[0]
    draws = {
        tuple(
            ids(
                llm.generate(
                    [prompt],
                    SamplingParams(temperature=1.5, seed=s, max_tokens=16, ignore_eos=True),
                    use_tqdm=False,
                )
            )[0]
        )
        for s in range(4)
    }
    greedy = tuple(
        ids(
            llm.generate(
                [prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False
            )
        )[0]
    )
    assert len(draws) > 1
    assert greedy not in draws


def test_top_k_one_is_greedy(llm):
    prompts = random_prompts([9, 31], seed=6)
    greedy = ids(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False))
    top1 = ids(
        llm.generate(prompts, SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=10), use_tqdm=False)
    )
    assert top1 == greedy


def greedy_continuation(llm) -> tuple[list[int], list[int]]:
    """A fixed prompt and its 20 greedy tokens, stop conditions off."""
    prompt = random_prompts([12], seed=9)[0]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    return prompt, ids(llm.generate([prompt], params, use_tqdm=False))[0]


def test_stop_token_ends_request(llm):
    prompt, full = greedy_continuation(llm)
    stop = full[6]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.token_ids == full[: full.index(stop) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


@pytest.fixture(scope="module")
def group(tiny_model):
    with LLM(
        tiny_model("llama"), dtype="float32", memory_per_replica=over_runtime("64MiB"), data_parallel_size=2
    ) as group:
        yield group


@pytest.mark.parametrize("where", ["llm", "group"])
def test_eos_stops_unless_ignored(where, request):
    """The EOS ids travel with each request: to a replica in this process and to a group's."""
    llm = request.getfixturevalue(where)
    prompt, full = greedy_continuation(llm)
    eos = full[4]
    saved = llm.eos_token_ids
    llm.eos_token_ids = (eos,)
    params = SamplingParams(temperature=0, max_tokens=20)
    try:
        stopped = llm.generate([prompt], params, use_tqdm=False)[0]
        ignored = llm.generate(
            [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
        )[0]
    finally:
        llm.eos_token_ids = saved
    assert params._eos_token_ids == ()  # the caller's params are left as they were
    assert stopped.outputs[0].token_ids == full[: full.index(eos) + 1]
    assert (stopped.outputs[0].finish_reason, stopped.outputs[0].stop_reason) == ("stop", None)
    assert ignored.outputs[0].token_ids == full


def test_length_limits(tiny_model):
    llm = LLM(
        tiny_model("llama"), dtype="float32", memory_per_replica=over_runtime("64MiB"), max_model_len=40
    )
    prompt = random_prompts([30], seed=2)[0]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    short = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert short.token_ids == out.token_ids[:3] and short.finish_reason == "length"


def test_outputs_in_input_order_with_text(llm):
    outputs = llm.generate(
        ["abc", "hello there", [5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False
    )
    assert [o.prompt for o in outputs] == ["abc", "hello there", None]
    assert outputs[2].prompt_token_ids == [5, 6, 7]
    assert outputs[0].prompt_token_ids == llm.tokenizer.encode("abc")
    for o in outputs:
        assert o.outputs[0].text == llm.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)
    assert len({o.request_id for o in outputs}) == 3


def test_chat_uses_template(llm):
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert out.prompt == "<user>hi</s><assistant>"
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)
    both = llm.chat([messages, messages], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert ids(both) == [out.outputs[0].token_ids] * 2
