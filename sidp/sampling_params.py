"""SamplingParams: how one request is decoded, with vLLM's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidp.errors import SidpError

GREEDY_TEMPERATURE = 1e-5  # below this, vLLM (and we) decode greedily


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    seed: int | None = None
    max_tokens: int | None = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop: list[str] | str | None = None  # strings that end the request; the text stops before them
    # The model's end-of-sequence ids, which end the request unless ignore_eos: set by LLM from the model's
    # config and its tokenizer (as vLLM's processor sets them from its tokenizer), not by users.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SidpError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}.")
        if self.n != 1:
            raise SidpError(
                f"SamplingParams(n={self.n}) is not supported yet: sidp returns one completion (n=1)."
            )
        if self.temperature < 0:
            raise SidpError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise SidpError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise SidpError(f"top_k must be -1, 0 (off) or a positive count, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SidpError(f"max_tokens must be at least 1, got {self.max_tokens}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
