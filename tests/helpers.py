"""Shared test helpers: transformers' greedy reference and a memory budget sized in KV blocks."""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sidp.errors import DoesNotFit
from sidp.memory import PoolShare, parse_bytes, plan_memory
from sidp.model.checkpoint import read_config
from sidp.model.spec import ModelSpec
from sidp.runtime_memory import decoder_bytes, runtime_bytes, tokenizer_bytes


@functools.cache
def _hf_model(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare fixed lengths; EOS handling is tested apart
    return model


@functools.cache
def _hf_greedy_one(path: Path, prompt: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    out = _hf_model(path).generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
    )
    return tuple(out[0, len(prompt) :].tolist())


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, run alone (no padding), in float32."""
    return [list(_hf_greedy_one(path, tuple(p), max_new_tokens)) for p in prompts]


def budget_for_blocks(
    path: Path,
    num_blocks: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 256,
    shares: list[PoolShare] | None = None,
    max_model_len: int | None = None,
    in_driver: bool = True,
) -> int:
    """The smallest memory_per_replica that leaves num_blocks KV blocks in the ledger (in the tightest
    replica of a SiDP group, given each replica's share of the pool); for 0, the largest that leaves none.
    in_driver: a lone replica in the driver's process (else replicas in processes of their own)."""
    spec = ModelSpec.from_hf_config(read_config(path))
    limits = (block_size, max_num_batched_tokens, max_num_seqs)
    extra = {
        "max_model_len": max_model_len,
        "runtime": runtime_bytes("cpu"),
        "decoder": 0 if in_driver else decoder_bytes(str(path), "cpu"),
        "driver": tokenizer_bytes(str(path), "cpu") if in_driver else 0,
    }

    def blocks(budget: int) -> int:
        try:
            return min(
                plan_memory(spec, dtype, budget, *limits, share=s, **extra).num_blocks
                for s in shares or [None]
            )
        except DoesNotFit:
            return 0

    low, high = 0, 2**40  # blocks(low) < wanted <= blocks(high)
    wanted = max(num_blocks, 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if blocks(middle) >= wanted else (middle, high)
    return high if num_blocks else high - 1


def over_runtime(size: str) -> str:
    """A memory_per_replica of `size` beyond what a replica's runtime takes, and (for a lone replica, in
    the driver's process) the driver's tokenizer of the tests' models (sidp.runtime_memory)."""
    return str(runtime_bytes("cpu") + _tiny_tokenizer_bytes() + parse_bytes(size))


def cli_engine_args(model: str) -> list[str]:
    """The CLI flags of a one-replica float32 run of a test model, beyond its runtime."""
    return ["--model", model, "--dtype", "float32", "--memory-per-replica", over_runtime("64MiB")] + [
        "--quiet",
        "--dp",
        "1",
    ]


@functools.cache
def _tiny_tokenizer_bytes() -> int:
    from conftest import build_tiny_model

    with tempfile.TemporaryDirectory() as folder:  # the tests' models all share one tokenizer
        return tokenizer_bytes(str(build_tiny_model(Path(folder), "llama", False)), "cpu")


def random_prompts(lengths: list[int], seed: int = 1, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def new_shm_entries(before: set[str], wait_s: float = 5.0) -> set[str]:
    """What /dev/shm holds that it did not hold `before`, once it stops shrinking or wait_s passes
    (a queue's feeder thread lets go of its semaphores as it exits)."""
    deadline = time.monotonic() + wait_s
    while not shm_entries() <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    return shm_entries() - before
