"""LLMEngine: one replica's loop — admit requests, schedule a step, run it, append tokens, retire finished."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from sidp.config import EngineConfig
from sidp.engine.block_manager import BlockManager
from sidp.engine.model_runner import ModelRunner
from sidp.engine.scheduler import ScheduledStep, Scheduler
from sidp.engine.sequence import Sequence
from sidp.memory import MemoryPlan
from sidp.model.checkpoint import load_decoder, open_checkpoint
from sidp.model.decoder import Decoder, WeightPool
from sidp.model.spec import ModelSpec
from sidp.sampling_params import SamplingParams


class StepRunner(Protocol):
    def run(self, step: ScheduledStep) -> list[int | None]:
        """The next token of each scheduled sequence, None where its prompt is still being read."""


@dataclass(slots=True)
class FinishedRequest:
    """What a finished sequence hands back: small and picklable, so replicas can send it to the driver."""

    seq_id: int
    output_token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None
    num_cached_tokens: int

    @classmethod
    def of(cls, seq: Sequence) -> FinishedRequest:
        return cls(
            seq.seq_id, seq.output_token_ids, seq.finish_reason, seq.stop_reason, seq.num_cached_prompt_tokens
        )


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        spec: ModelSpec,
        plan: MemoryPlan,
        pool: WeightPool | None = None,
        runner: StepRunner | None = None,
        decode: Callable[[list[int]], str] | None = None,
    ):
        """runner: what runs a scheduled step; by default the decoder on config.model. The planner
        passes its step-time model instead, so its predictions come from this very scheduler.
        decode: token ids → text for stop strings (by default the model's, loaded on first use)."""
        self.config = config
        self.plan = plan
        if runner is None:
            checkpoint = open_checkpoint(config.model)
            model = Decoder(
                spec,
                checkpoint,
                config.dtype,
                config.max_model_len,
                pool,
                config.device,
                pack_tied_head=plan.packs_tied_head,
            )
            runner = ModelRunner(model, plan.num_blocks, config.block_size, config.dtype, config.device)
        self.runner = runner
        self._decode = decode  # else loaded when a request first asks for stop strings
        blocks = BlockManager(plan.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.num_steps = 0

    def add_request(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        """prompt_token_ids must already be checked against max_model_len by the caller."""
        room = self.config.max_model_len - len(prompt_token_ids)
        max_total = len(prompt_token_ids) + min(room, params.max_tokens or room)
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        seq = Sequence(seq_id, list(prompt_token_ids), params, max_total, generator=generator)
        self.scheduler.add(seq)
        return seq

    def counters(self, rank: int = 0) -> dict:
        """Cumulative figures: steps, preemptions and, on a GPU, the most memory this process held."""
        counters = {"replica": rank, "steps": self.num_steps, "preemptions": self.scheduler.num_preemptions}
        if self.config.device == "cuda":
            counters["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return counters

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def wants_requests(self) -> bool:
        """Room for another request: a sequence slot is free, nothing waits for KV room, and what is held
        does not yet fill the next step's token budget, so one step can start several prompts."""
        s = self.scheduler
        if s.short_of_blocks or len(s.running) + len(s.waiting) >= s.max_num_seqs:
            return False
        held = sum(seq.num_uncomputed_tokens for seq in itertools.chain(s.running, s.waiting))
        return held < s.max_num_batched_tokens

    def step(self) -> list[FinishedRequest]:
        """Run one step; return the requests that finished in it."""
        step = self.scheduler.schedule()
        if not step.seqs:
            raise RuntimeError("the scheduler produced an empty step while requests are pending")
        starts = [seq.num_computed_tokens for seq in step.seqs]
        tokens = self.runner.run(step)
        self.num_steps += 1
        finished = []
        for seq, n, start, token in zip(step.seqs, step.num_new_tokens, starts, tokens, strict=True):
            seq.num_computed_tokens += n
            self.scheduler.block_manager.register_full_blocks(seq, start)
            if token is None:
                continue
            seq.token_ids.append(token)
            if self._stops(seq, token):
                self.scheduler.finish(seq)
                finished.append(FinishedRequest.of(seq))
        return finished

    def _stops(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        if token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return True
        if p.stop and (hit := self._stop_string(seq)) is not None:
            seq.finish_reason, seq.stop_reason = "stop", hit
            return True
        if not p.ignore_eos and token in p._eos_token_ids:
            seq.finish_reason = "stop"
            return True
        if seq.num_tokens >= seq.max_total_tokens:
            seq.finish_reason = "length"
            return True
        return False

    def _stop_string(self, seq: Sequence) -> str | None:
        """The stop string the newest tokens completed, if any: only the tail is decoded, as long as the
        longest stop string in tokens (a token is at least one character) plus a few for merged bytes."""
        if self._decode is None:
            self._decode = load_decoder(self.config.model)
        stops = seq.params.stop
        tail = self._decode(seq.output_token_ids[-(max(map(len, stops)) + 4) :])
        return next((s for s in stops if s in tail), None)

    def run(
        self, requests: list[tuple[list[int], SamplingParams]], on_finish: Callable[[FinishedRequest], None]
    ) -> list[FinishedRequest]:
        """Run requests to completion in this process; results in request order."""
        for seq_id, (token_ids, params) in enumerate(requests):
            self.add_request(seq_id, token_ids, params)
        finished: list[FinishedRequest | None] = [None] * len(requests)
        try:
            while self.has_work():
                for done in self.step():
                    finished[done.seq_id] = done
                    on_finish(done)
        except BaseException:
            self.abort_all()  # an interrupted call leaves nothing behind for the next one
            raise
        return finished

    def close(self) -> None:
        pass

    def abort_all(self) -> None:
        """Drop every unfinished request and free its KV blocks."""
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq)
        self.scheduler.waiting.clear()
