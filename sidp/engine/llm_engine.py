"""LLMEngine: one replica's loop — admit requests, schedule a step, run it, append tokens, retire finished."""

from __future__ import annotations

import itertools

import torch

from sidp.config import EngineConfig
from sidp.engine.block_manager import BlockManager
from sidp.engine.model_runner import ModelRunner
from sidp.engine.scheduler import Scheduler
from sidp.engine.sequence import Sequence
from sidp.memory import MemoryPlan
from sidp.model.checkpoint import open_checkpoint
from sidp.model.decoder import Decoder
from sidp.model.spec import ModelSpec
from sidp.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, spec: ModelSpec, plan: MemoryPlan):
        self.config = config
        self.plan = plan
        model = Decoder(spec, open_checkpoint(config.model), config.dtype, config.max_model_len)
        self.runner = ModelRunner(model, plan.num_blocks, config.block_size, config.dtype)
        blocks = BlockManager(plan.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self._ids = itertools.count()
        self.num_steps = 0

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        """prompt_token_ids must already be checked against max_model_len by the caller."""
        room = self.config.max_model_len - len(prompt_token_ids)
        max_total = len(prompt_token_ids) + min(room, params.max_tokens or room)
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        seq = Sequence(next(self._ids), list(prompt_token_ids), params, max_total, generator=generator)
        self.scheduler.add(seq)
        return seq

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Run one step; return the sequences that finished in it."""
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
                finished.append(seq)
        return finished

    def _stops(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        if token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return True
        if not p.ignore_eos and token in self.config.eos_token_ids:
            seq.finish_reason = "stop"
            return True
        if seq.num_tokens >= seq.max_total_tokens:
            seq.finish_reason = "length"
            return True
        return False

    def abort_all(self) -> None:
        """Drop every unfinished request and free its KV blocks."""
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq)
        self.scheduler.waiting.clear()
