"""Plain data parallelism: N replica processes give the same greedy tokens as one, and fail loudly."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import pytest
from helpers import budget_for_blocks, hf_greedy, new_shm_entries, over_runtime, random_prompts, shm_entries

from sidp import LLM, SamplingParams, SidpError
from sidp.model.checkpoint import read_config
from sidp.pool.modes import default_mode
from sidp.pool.placement import Placement, parse_parts, pool_share
from sidp.pool.transport import transport_for

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


MODES = [("none", "auto"), ("sidp", "was"), ("sidp", "cas"), ("sidp", "auto"), ("sidp", "map")]


def group(path, size, sharing, mode, blocks=6, parts="mlp", placement="round_robin", **kwargs) -> LLM:
    """A group whose tightest replica has `blocks` KV blocks, prefill chunked by 32 tokens, 3 seqs at most."""
    shares = None
    if sharing == "sidp":
        layout = Placement.build(read_config(path)["num_hidden_layers"], size, placement)
        shares = [pool_share(layout, rank, parse_parts(parts), mode, 2) for rank in range(size)]
    budget = budget_for_blocks(
        path,
        blocks,
        max_num_batched_tokens=32,
        max_num_seqs=3,
        shares=shares,
        max_model_len=blocks * 16,
        in_driver=size == 1,
    )
    return LLM(
        path,
        dtype="float32",
        memory_per_replica=budget,
        data_parallel_size=size,
        weight_sharing=sharing,
        sidp_mode=mode,
        pooled_parts=parts,
        placement=placement,
        max_num_batched_tokens=32,
        max_num_seqs=3,
        max_model_len=blocks * 16,
        **kwargs,
    )


# Prompts of ~40 tokens fill 3 of a replica's 6 blocks each: two running sequences both need a 4th
# block a few tokens in, so replicas preempt; prompts are read in 32-token chunks.
PROMPTS = random_prompts([40, 37, 45, 33, 41, 39, 44, 35, 5, 80, 42, 38, 36, 43])


@pytest.mark.parametrize(("sharing", "mode"), MODES)
@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize(("family", "layers"), [("llama", 5), ("qwen2", 4), ("qwen3", 4)])
def test_every_mode_equals_transformers(tiny_model, family, layers, size, sharing, mode):
    """Plain DP and SiDP was / cas / auto, N=2 and N=3 (layer counts N does not divide), with chunked
    prefill and preemption: the same greedy tokens as transformers."""
    path = tiny_model(family, layers=layers)
    llm = group(path, size, sharing, mode)
    try:
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(path, PROMPTS, 12)
        assert [o.prompt_token_ids for o in outputs] == PROMPTS
        counters = llm._backend.counters.values()
        assert sum(c["preemptions"] for c in counters) > 0
        for c in counters if sharing == "sidp" else ():  # each borrowed its remote layers the mode's way
            assert c["steps_was"] + c["steps_cas"] + c["steps_map"] == c["steps"] > 0
            if mode != "auto":
                assert c[f"steps_{mode}"] == c["steps"]
            if mode == "cas":
                assert c["cas_sent"] > 0 and "was_bytes_fetched" not in c
            if mode == "was":
                assert c["was_bytes_fetched"] > 0 and "cas_sent" not in c
            if mode == "map":
                assert "was_bytes_fetched" not in c and "cas_sent" not in c
        if mode == "cas" and size == 3:  # two requesters can wait on one owner's layer at once: fused
            assert sum(c["cas_fused"] for c in counters) > 0
        again = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)  # the group serves call after call
        assert [o.request_id for o in again] == [str(len(PROMPTS)), str(len(PROMPTS) + 1)]
    finally:
        llm.close()


@pytest.mark.parametrize("mode", ["was", "cas", "auto", "map"])
@pytest.mark.parametrize(("parts", "placement"), [("mlp,attn,embed", "contiguous"), ("attn", "round_robin")])
def test_pooling_options_equal_transformers(tiny_model, parts, placement, mode):
    """Attention projections and the embedding / LM head pooled too (untied: both are borrowed)."""
    path = tiny_model("qwen2", layers=4)
    llm = group(path, 3, "sidp", mode, parts=parts, placement=placement)
    try:
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(path, PROMPTS, 12)
    finally:
        llm.close()


@pytest.mark.parametrize(("sharing", "mode"), [("none", "auto"), ("sidp", "cas"), ("sidp", "auto")])
def test_killed_replica_raises_stops_the_group_and_leaves_no_segment(tiny_model, sharing, mode):
    shm_before = shm_entries()
    llm = LLM(
        tiny_model("llama"),
        dtype="float32",
        memory_per_replica=over_runtime("64MiB"),
        data_parallel_size=2,
        max_num_seqs=2,
        weight_sharing=sharing,
        sidp_mode=mode,
    )
    replicas = list(llm._backend.procs)
    victim = replicas[1]
    outcome: dict = {}

    def run(llm: LLM, outcome: dict) -> None:
        try:
            llm.generate(
                random_prompts([20] * 16), SamplingParams(max_tokens=900, ignore_eos=True), use_tqdm=False
            )
        except SidpError as error:
            outcome["error"] = error

    worker = threading.Thread(target=run, args=(llm, outcome))
    worker.start()
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGKILL)
    started = time.monotonic()
    worker.join(30)
    assert not worker.is_alive()
    assert time.monotonic() - started < 10
    assert "Replica 1 died" in str(outcome["error"])
    assert not any(p.is_alive() for p in replicas)
    with pytest.raises(SidpError, match="create a new LLM"):
        llm.generate(["a"], GREEDY, use_tqdm=False)
    del llm, replicas, victim, outcome  # Process objects and tracebacks keep the queues alive
    gc.collect()
    assert not new_shm_entries(shm_before)


def test_bad_group_arguments(tiny_model):
    with pytest.raises(SidpError, match="data_parallel_size"):
        LLM(tiny_model("llama"), data_parallel_size=0)
    with pytest.raises(SidpError, match="weight_sharing"):
        LLM(tiny_model("llama"), data_parallel_size=2, weight_sharing="everything")
    with pytest.raises(SidpError, match="sidp_mode must be one of auto, was, cas, map"):
        LLM(tiny_model("llama"), data_parallel_size=2, weight_sharing="sidp", sidp_mode="fast")
    with pytest.raises(SidpError, match="pooled_parts"):
        LLM(tiny_model("llama"), data_parallel_size=2, weight_sharing="sidp", pooled_parts="lm_head")


def test_default_mode_reads_peers_in_place_where_the_transport_maps_them(tiny_model):
    assert default_mode(transport_for("cpu")) == "map"
    llm = LLM(
        tiny_model("llama"),
        dtype="float32",
        memory_per_replica=over_runtime("64MiB"),
        data_parallel_size=2,
        weight_sharing="sidp",
    )
    try:
        assert llm.config.sidp_mode == "map"
        assert all(
            p.weights["pool: WaS cache slots"] == p.weights["pool: CaS buffers"] == 0 for p in llm.plans
        )
        llm.generate(random_prompts([9, 20]), GREEDY, use_tqdm=False)
        assert all(c["steps_map"] == c["steps"] > 0 for c in llm.replica_counters())
    finally:
        llm.close()
