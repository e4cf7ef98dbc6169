"""Greedy output equals transformers token for token, however the engine batches, chunks and preempts."""

from __future__ import annotations

import pytest
from helpers import budget_for_blocks, hf_greedy, over_runtime, random_prompts

from sidp import LLM, SamplingParams

FAMILIES = ["llama", "qwen2", "qwen3"]
LENGTHS = [5, 40, 17, 100, 3, 33]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def generate_ids(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_transformers(tiny_model, family, tied):
    path = tiny_model(family, tied)
    prompts = random_prompts(LENGTHS)
    llm = LLM(path, dtype="float32", memory_per_replica=over_runtime("64MiB"))
    assert generate_ids(llm, prompts) == hf_greedy(path, prompts, 12)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_transformers(tiny_model, family):
    path = tiny_model(family)
    prompts = random_prompts(LENGTHS)
    # A 24-token step budget splits the 100- and 40-token prompts into chunks across several steps.
    llm = LLM(path, dtype="float32", memory_per_replica=over_runtime("64MiB"), max_num_batched_tokens=24)
    assert generate_ids(llm, prompts) == hf_greedy(path, prompts, 12)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_equals_transformers(tiny_model, family, prefix_caching):
    path = tiny_model(family)
    prompts = random_prompts(LENGTHS)
    # 10 blocks of 16 tokens cannot hold all six sequences (they need 15 blocks at their longest).
    budget = budget_for_blocks(path, 10, max_num_batched_tokens=64, max_model_len=128)
    llm = LLM(
        path,
        dtype="float32",
        memory_per_replica=budget,
        max_num_batched_tokens=64,
        max_model_len=128,
        enable_prefix_caching=prefix_caching,
    )
    assert llm.engine.plan.num_blocks == 10
    assert generate_ids(llm, prompts) == hf_greedy(path, prompts, 12)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_caching_reuses_blocks_exactly(tiny_model, family):
    path = tiny_model(family)
    shared = random_prompts([48], seed=7)[0]
    tails = random_prompts([3, 20, 1, 9], seed=8)
    prompts = [shared + t for t in tails] + [shared + tails[1]]  # the last repeats a whole prompt
    want = hf_greedy(path, prompts, 12)
    llm = LLM(path, dtype="float32", memory_per_replica=over_runtime("64MiB"), max_num_batched_tokens=32)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == want
    assert max(o.num_cached_tokens for o in outputs) >= 48
    again = llm.generate(prompts, GREEDY, use_tqdm=False)  # a second call finds all of it cached
    assert [o.outputs[0].token_ids for o in again] == want
    assert all(o.num_cached_tokens >= 48 for o in again)


def test_prefix_caching_off_caches_nothing(tiny_model):
    path = tiny_model("llama")
    prompts = random_prompts([40, 40], seed=3) * 2
    llm = LLM(path, dtype="float32", memory_per_replica=over_runtime("64MiB"), enable_prefix_caching=False)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert all(o.num_cached_tokens == 0 for o in outputs)


def test_engine_asks_for_a_steps_worth_of_requests(tiny_model):
    """A replica asks for requests until what it holds fills its next step's token budget, so one step
    starts several prompts; never while a request waits for KV blocks."""
    path = tiny_model("llama")
    budget = budget_for_blocks(path, 4, max_num_batched_tokens=64, max_model_len=64)
    llm = LLM(path, dtype="float32", memory_per_replica=budget, max_num_batched_tokens=64, max_model_len=64)
    engine = llm.engine
    assert engine.plan.num_blocks == 4
    prompts = random_prompts([20, 20, 20, 20, 20])
    held = 0
    while engine.wants_requests():
        engine.add_request(held, prompts[held], GREEDY)
        held += 1
    assert held == 4  # 60 tokens held are under the 64 of a step; 80 are not
    engine.step()
    # Two prompts started in one step; the third found no free block (each takes 2 of the 4).
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 2
    assert not engine.wants_requests()
