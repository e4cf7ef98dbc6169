"""The synthetic benchmark workload: random-token prompts and fixed output lengths, as vLLM's random dataset.

Every request asks for exactly `output_len` tokens with EOS ignored, so each engine does the same work and
throughput is comparable across engines and runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from sidp.errors import SidpError


@dataclass(slots=True)
class Request:
    prompt_token_ids: list[int]
    output_len: int


def random_workload(
    num_requests: int,
    input_len: tuple[int, int] = (100, 400),
    output_len: tuple[int, int] = (64, 256),
    *,
    vocab_size: int,
    seed: int = 0,
    avoid_ids: Iterable[int] = (),
) -> list[Request]:
    """Prompt and output lengths uniform over the inclusive ranges; token ids uniform over the vocabulary
    minus `avoid_ids` (special tokens would give the model control signals instead of text)."""
    for name, (low, high) in (("input_len", input_len), ("output_len", output_len)):
        if not 1 <= low <= high:
            raise SidpError(f"{name} range {low}:{high} must satisfy 1 <= low <= high.")
    if num_requests < 1:
        raise SidpError(f"num_requests must be at least 1, got {num_requests}.")
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(avoid_ids, dtype=np.int64, count=-1))
    if allowed.size == 0:
        raise SidpError("Every token id of the vocabulary is a special id: no tokens left for prompts.")
    # A private generator: the workload depends on the seed alone, not on whatever else drew numbers before.
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(input_len[0], input_len[1], size=num_requests, endpoint=True)
    output_lens = rng.integers(output_len[0], output_len[1], size=num_requests, endpoint=True)
    return [
        Request(allowed[rng.integers(0, allowed.size, size=n)].tolist(), int(m))
        for n, m in zip(prompt_lens, output_lens, strict=True)
    ]


def prompt_tokens(requests: Sequence[Request]) -> int:
    return sum(len(r.prompt_token_ids) for r in requests)


def output_tokens(requests: Sequence[Request]) -> int:
    return sum(r.output_len for r in requests)


def rates(requests: Sequence[Request], elapsed: float) -> dict:
    """vLLM's three throughput numbers; output tokens are the requested lengths, each engine must meet."""
    out = output_tokens(requests)
    return {
        "elapsed_s": elapsed,
        "requests_per_s": len(requests) / elapsed,
        "total_tokens_per_s": (prompt_tokens(requests) + out) / elapsed,
        "output_tokens_per_s": out / elapsed,
    }


def throughput_line(result: dict) -> str:
    """The line vLLM's benchmark_throughput prints, in the same words, so results can be read side by side."""
    return (
        f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['total_tokens_per_s']:.2f} "
        f"total tokens/s, {result['output_tokens_per_s']:.2f} output tokens/s"
    )
