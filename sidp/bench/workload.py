"""Benchmark workloads: random-token prompts as in vLLM's random dataset, the SiDP paper's fixed shapes,
or real prompts from a JSONL file.

Every request asks for exactly `output_len` tokens with EOS ignored, so each engine does the same work and
throughput is comparable across engines and runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sidp.errors import SidpError

if TYPE_CHECKING:  # transformers is slow to import and only the JSONL workload needs a tokenizer
    from transformers import PreTrainedTokenizerBase

# The SiDP paper's prompt lengths by task. The paper fixes no output length; SHAPE_OUTPUT_LEN is ours.
SHAPES = {"summarization": 1024, "code": 2048, "conversation": 4096}
SHAPE_OUTPUT_LEN = 256


@dataclass(slots=True)
class Request:
    prompt_token_ids: list[int]
    output_len: int


@dataclass(slots=True)
class Workload:
    name: str  # "random", a key of SHAPES, or the JSONL file it was read from
    requests: list[Request]
    input_len: tuple[int, int]  # the span prompt lengths come from; warm-up prompts draw from it too
    output_len: tuple[int, int]
    scale: float


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


def fixed_workload(
    shape: str,
    num_requests: int,
    *,
    scale: float = 1.0,
    vocab_size: int,
    seed: int = 0,
    avoid_ids: Iterable[int] = (),
) -> list[Request]:
    """Random-token prompts of exactly the shape's length, each asking for SHAPE_OUTPUT_LEN tokens; both
    lengths multiplied by `scale` so a CPU can run the same shapes smaller."""
    if shape not in SHAPES:
        raise SidpError(f"Unknown workload shape {shape!r}: choose from {', '.join(SHAPES)}.")
    n, m = scaled(SHAPES[shape], scale), scaled(SHAPE_OUTPUT_LEN, scale)
    return random_workload(
        num_requests, (n, n), (m, m), vocab_size=vocab_size, seed=seed, avoid_ids=avoid_ids
    )


def scaled(tokens: int, scale: float) -> int:
    if not scale > 0:
        raise SidpError(f"--scale must be more than 0, got {scale}.")
    return max(1, round(tokens * scale))


def jsonl_workload(
    path: Path, tokenizer: PreTrainedTokenizerBase, output_len: tuple[int, int], *, seed: int = 0
) -> list[Request]:
    """One request per line of `path`, in a format `sidp generate --input` reads (OpenAI Batch or plain);
    a line's max_tokens is its output length, else one drawn uniformly from `output_len`."""
    from sidp.batch.formats import LineError, parse_line, prompt_token_ids

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SidpError(f"Cannot read the workload {path}: {error}") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise SidpError(f"{path} holds no requests.")
    rng = np.random.default_rng(seed)
    drawn = rng.integers(output_len[0], output_len[1], size=len(numbered), endpoint=True)
    requests = []
    for (number, line), default in zip(numbered, drawn, strict=True):
        try:
            request = parse_line(line)
            max_tokens = request.sampling.get("max_tokens", int(default))
            if type(max_tokens) is not int or max_tokens < 1:  # bool is an int subclass, and no length
                raise LineError("max_tokens must be a whole number of at least 1")
            requests.append(Request(prompt_token_ids(tokenizer, request), max_tokens))
        except LineError as error:
            raise SidpError(f"{path} line {number}: {error}.") from None
    return requests


def build_workload(
    name: str,
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    *,
    scale: float,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    avoid_ids: Iterable[int],
) -> Workload:
    """The workload `sidp bench --workload NAME` runs: "random", a shape of SHAPES, or a .jsonl path."""
    if scale != 1.0 and name not in SHAPES:  # silently ignored, it would mislabel the run
        raise SidpError(f"--scale applies to {', '.join(SHAPES)}; size --workload {name} by its own lengths.")
    if name == "random":
        reqs = random_workload(
            num_requests, input_len, output_len, vocab_size=vocab_size, seed=seed, avoid_ids=avoid_ids
        )
    elif name in SHAPES:
        reqs = fixed_workload(
            name, num_requests, scale=scale, vocab_size=vocab_size, seed=seed, avoid_ids=avoid_ids
        )
    elif name.endswith(".jsonl"):
        reqs = jsonl_workload(Path(name), tokenizer, output_len, seed=seed)
    else:
        shapes = ", ".join(SHAPES)
        raise SidpError(f"--workload {name!r}: choose random, {shapes}, or a path ending in .jsonl.")
    if name != "random":  # what was drawn, so warm-up prompts look like the timed ones
        input_len = (min(len(r.prompt_token_ids) for r in reqs), max(len(r.prompt_token_ids) for r in reqs))
        output_len = (min(r.output_len for r in reqs), max(r.output_len for r in reqs))
    return Workload(name, reqs, input_len, output_len, scale)


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
