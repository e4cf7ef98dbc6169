"""The transformers baseline: `generate` over static padded batches, the way vLLM's `run_hf` measures it.

Requests go in workload order, a batch at a time; every sequence of a batch decodes as many tokens as
the longest request asks for, but only the requested lengths count as output (vLLM counts the same way),
so padding and over-generation are the baseline's real cost, not a bookkeeping artefact.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from sidp.bench.workload import Request, rates
from sidp.errors import SidpError

# The probe is one batch of the workload, shrunk: prompts and outputs cut to an eighth keep its padding and
# prefill/decode mix, while four batch sizes still fit in about a minute of bfloat16 on two cores.
PROBE_SHRINK = 8
PROBE_OUTPUT_LEN = 32


def load_model(model_path: str | Path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    # A bare config: no EOS (the workload ignores it) and none of the checkpoint's sampling defaults.
    model.generation_config = GenerationConfig(pad_token_id=pad)
    return model.eval()


def generate_batch(model, batch: Sequence[Request]) -> torch.Tensor:
    """Greedy continuation of one left-padded batch: [len(batch), max output_len] new token ids."""
    width = max(len(r.prompt_token_ids) for r in batch)
    new_tokens = max(r.output_len for r in batch)
    pad = model.generation_config.pad_token_id
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        # Left padding keeps every prompt's last token in the final column, where decoding continues.
        input_ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
        attention_mask[row, width - len(r.prompt_token_ids) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
    generated = out[:, width:]
    if generated.shape[1] != new_tokens:
        raise SidpError(
            f"transformers generated {generated.shape[1]} tokens where {new_tokens} were asked; "
            "the baseline's numbers would not be comparable."
        )
    return generated


def timed_run(model, requests: Sequence[Request], batch_size: int) -> dict:
    """Time the workload at one batch size on a loaded model (like vLLM, load time is not throughput)."""
    if batch_size < 1:
        raise SidpError(f"batch size must be at least 1, got {batch_size}.")
    computed = 0
    started = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        computed += generate_batch(model, batch).numel()
    elapsed = time.perf_counter() - started
    # generated_tokens: what the batches actually decoded, padding rows included, to show the waste.
    return {"batch_size": batch_size, **rates(requests, elapsed), "generated_tokens": computed}


def run_transformers(
    model_path: str | Path, requests: Sequence[Request], dtype: torch.dtype, batch_size: int
) -> dict:
    """Load the model with transformers and time the workload in padded batches of batch_size."""
    return timed_run(load_model(model_path, dtype), requests, batch_size)


def best_transformers(
    model_path: str | Path,
    requests: Sequence[Request],
    dtype: torch.dtype,
    batch_sizes: Sequence[int] = (8, 16, 32, 64),
) -> dict:
    """Probe each batch size on its first batch, shrunk; then run the whole workload at the fastest.

    The probe also warms transformers up, as sidp's warmup requests do for sidp.
    """
    if not batch_sizes:
        raise SidpError("Give at least one transformers batch size to try.")
    model = load_model(model_path, dtype)
    started = time.perf_counter()
    probe = [timed_run(model, shrink(requests[:bs]), bs) for bs in batch_sizes]
    probe_s = time.perf_counter() - started
    # Total tokens/s, since each batch size probes a different slice whose prompts differ in length.
    best = max(probe, key=lambda p: p["total_tokens_per_s"])
    return {**timed_run(model, requests, best["batch_size"]), "probe": probe, "probe_s": probe_s}


def shrink(requests: Sequence[Request]) -> list[Request]:
    return [
        Request(
            r.prompt_token_ids[: max(1, len(r.prompt_token_ids) // PROBE_SHRINK)],
            min(PROBE_OUTPUT_LEN, max(1, r.output_len // PROBE_SHRINK)),
        )
        for r in requests
    ]
