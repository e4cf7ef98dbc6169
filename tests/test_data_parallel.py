"""Plain data parallelism: N replica processes give the same greedy tokens as one, and fail loudly."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import pytest
from helpers import hf_greedy, random_prompts

from sidp import LLM, SamplingParams, SidpError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize(
    ("sharing", "placement"), [("none", "round_robin"), ("sidp", "round_robin"), ("sidp", "contiguous")]
)
@pytest.mark.parametrize(("family", "size", "layers"), [("llama", 2, 3), ("qwen2", 3, 4), ("qwen3", 2, 3)])
def test_replicas_equal_transformers(tiny_model, family, size, layers, sharing, placement):
    """Plain DP and SiDP weight-as-a-service, N=2 and N=3, layer counts N does not divide, chunked prefill."""
    path = tiny_model(family, layers=layers)
    prompts = random_prompts([5, 40, 17, 100, 3, 33, 8, 61])
    llm = LLM(
        path,
        dtype="float32",
        memory_per_replica="64MiB",
        data_parallel_size=size,
        weight_sharing=sharing,
        placement=placement,
        max_num_batched_tokens=32,
        max_num_seqs=3,
    )
    try:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(path, prompts, 12)
        assert [o.prompt_token_ids for o in outputs] == prompts
        counters = llm._backend.counters
        assert sum(c["steps"] for c in counters.values()) > 0
        if sharing == "sidp":  # every replica that served had to borrow the layers it does not own
            assert all(c["was_bytes_fetched"] > 0 for c in counters.values())
        again = llm.generate(prompts[:2], GREEDY, use_tqdm=False)  # the group serves call after call
        assert [o.request_id for o in again] == [str(len(prompts)), str(len(prompts) + 1)]
    finally:
        llm.close()


@pytest.mark.parametrize("sharing", ["none", "sidp"])
def test_killed_replica_raises_stops_the_group_and_leaves_no_segment(tiny_model, sharing):
    shm_before = set(os.listdir("/dev/shm"))
    llm = LLM(
        tiny_model("llama"),
        dtype="float32",
        memory_per_replica="64MiB",
        data_parallel_size=2,
        max_num_seqs=2,
        weight_sharing=sharing,
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
    deadline = time.monotonic() + 5  # a queue's feeder thread lets go of its semaphores as it exits
    while not set(os.listdir("/dev/shm")) <= shm_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(os.listdir("/dev/shm")) <= shm_before


def test_bad_group_arguments(tiny_model):
    with pytest.raises(SidpError, match="data_parallel_size"):
        LLM(tiny_model("llama"), data_parallel_size=0)
    with pytest.raises(SidpError, match="weight_sharing"):
        LLM(tiny_model("llama"), data_parallel_size=2, weight_sharing="everything")
