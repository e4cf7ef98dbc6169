"""Continuous batching with chunked prefill under a per-step token budget, and preemption by recompute.

Each step first serves the running sequences in arrival order (a decode costs one token, an
unfinished prompt gets the next chunk), then admits waiting ones while tokens, sequence slots and
KV blocks last. When a running sequence needs a block and none is free, the most recently admitted
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed later. A sequence that fits the cache alone therefore always finishes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sidp.engine.block_manager import BlockManager
from sidp.engine.sequence import Sequence, Status


@dataclass(slots=True)
class ScheduledStep:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.short_of_blocks = False  # the last step preempted, or left a request waiting for KV blocks

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep([], [])
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            n = min(seq.num_uncomputed_tokens, budget)
            if self._make_room(seq, n, step):
                self.block_manager.grow(seq, n)
                step.seqs.append(seq)
                step.num_new_tokens.append(n)
                budget -= n
                index += 1
        self.short_of_blocks = step.num_preempted > 0
        if not self.short_of_blocks:
            self._admit_waiting(step, budget)
        return step

    def _make_room(self, seq: Sequence, n: int, step: ScheduledStep) -> bool:
        """Preempt from the tail until seq can grow by n tokens; False if seq itself had to go."""
        while not self.block_manager.can_grow(seq, n):
            victim = self.running[-1]
            self._preempt(victim)
            step.num_preempted += 1
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, step: ScheduledStep, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.block_manager.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(hits) * self.block_manager.block_size, budget)
            if not self.block_manager.can_admit(seq, hits, n):
                self.short_of_blocks = True
                break
            self.waiting.popleft()
            self.block_manager.admit(seq, hits)
            self.block_manager.grow(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.seqs.append(seq)
            step.num_new_tokens.append(n)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.release(seq)
        seq.status = Status.FINISHED
