"""Next-token choice from logits in the model's dtype: greedy rows in one argmax, sampled rows in float32
with their own generator.

Each sampled sequence draws from its own torch.Generator (seeded from its request's seed), so the
same seed gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import torch

from sidp.model.fused import greedy_argmax
from sidp.sampling_params import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    chosen = greedy_argmax(logits).tolist()  # widening to float32 is exact, so the same index
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:  # drawn on the CPU, whatever the device: a seed gives the same tokens on each
            chosen[row] = _sample_row(logits[row].float().cpu(), p, gen)
    return chosen


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    # Gumbel-style draw: argmax of p / Exp(1) samples from p, and needs no renormalisation.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())
