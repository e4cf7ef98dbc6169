"""Predicted throughput of a SiDP group on one clock: the replicas' own schedulers, as in simulate.py,
with each step laid out layer by layer so that replicas meet where they share (sidp.plan.events).

- CaS: a borrowed layer's rows reach the owner's queue after half their round trips (one per op and
  chunk of CAS_ROWS rows, as the pool's policy counts them) and are answered after the other half.
  The owner's GPU serves every request waiting for a layer in one pass (one read of its pooled
  weights, all the rows' FLOPs), passes one after another and ahead of its own work, which pauses for
  them: serving delays the owner's own step by the time it serves, and a request waits only for the
  passes before it.
- WaS: a replica copies its borrowed layers in order on one copy stream into its slots, each copy
  starting when the previous one is done and a slot is free; copies running from one owner at once
  share its outgoing link equally.
- Mode per step: the pool's policy (auto), which learns from the waits and copies each step saw as
  the engine's does (sidp.pool.member), so the group's queues and shared links price its choices.

With no borrowed layers a step is its held work alone, exactly as simulate.py prices it.
"""

from __future__ import annotations

from collections import deque
from functools import partial

from sidp.bench.workload import Request
from sidp.engine.llm_engine import LLMEngine
from sidp.engine.scheduler import ScheduledStep
from sidp.model.spec import ModelSpec
from sidp.plan.capacity import Capacity
from sidp.plan.events import Clock, Gpu, Link
from sidp.plan.simulate import Prediction, hand_out, planned_engines, prediction
from sidp.plan.step_time import StepTime, next_tokens, step_shape


class ShapeRunner:
    """The engine's step runner in the group: it keeps the step's shape for the clock to price."""

    def __init__(self) -> None:
        self.shape = (0, 0, 0, 0)

    def run(self, step: ScheduledStep) -> list[int | None]:
        self.shape = step_shape(step)
        return next_tokens(step)


def segments(owners: tuple[int, ...], rank: int) -> list[tuple[int, int, int | None, int | None]]:
    """A step of `rank` as runs of its own work, each ended by a borrowed layer's pooled part:
    (layers whose held part runs, of those the layers whose pooled part is held too, owner, layer);
    the last run ends the step (owner and layer None)."""
    runs, layers, held = [], 0, 0
    for layer, owner in enumerate(owners):
        layers += 1
        if owner == rank:
            held += 1
        else:
            runs.append((layers, held, owner, layer))
            layers = held = 0
    runs.append((layers, held, None, None))
    return runs


class Member:
    """One replica in the group: its engine, its GPU, and the step it is in."""

    def __init__(
        self, group: Group, rank: int, engine: LLMEngine, step_time: StepTime, owners: tuple[int, ...]
    ):
        self.group, self.rank, self.engine, self.step_time = group, rank, engine, step_time
        self.runner: ShapeRunner = engine.runner
        self.gpu = Gpu(group.clock, step_time.pooled_s)
        self.runs = segments(owners, rank)
        self.borrowed = [owner for _, _, owner, _ in self.runs if owner is not None]
        self.finished_at = 0.0
        self.mode: str | None = None
        self.cas_wait_s = self.copy_s = 0.0

    def step(self) -> None:
        """At the end of the last step (or the start): learn from it, take requests, start the next."""
        clock, engine, timing = self.group.clock, self.engine, self.step_time
        if self.mode and timing.mode == "auto" and self.group.learn:
            if self.mode == "cas":
                timing.policy.observe_cas(self.rows, self.cas_wait_s)
            elif self.mode == "was":
                timing.policy.observe_copy(self.copy_s)
        hand_out(self.group.pending, engine)
        if not engine.has_work():
            self.finished_at, self.mode = clock.now, None
            return
        engine.step()
        tokens, seqs, attended, kv_read = self.runner.shape
        self.rows = tokens
        self.layer_s = timing.layer_s(tokens, seqs, attended, kv_read)
        self.pooled_s = timing.pooled_s(tokens)
        self.tail_s = timing.tail_s(seqs)
        self.mode = timing.choose(tokens)
        self.run, self.cas_wait_s = 0, 0.0
        self.copies, self.copied, self.used, self.copying, self.wants_copy = 0, 0, 0, False, False
        if self.mode == "was":
            self._copy_next()
        self._own_run()

    def _own_run(self) -> None:
        layers, held, owner, _ = self.runs[self.run]
        seconds = layers * self.layer_s + held * self.pooled_s
        if owner is None:
            self.gpu.work(seconds + self.tail_s, self.step)
        else:
            self.gpu.work(seconds, self._borrow)

    def _borrow(self) -> None:
        _, _, owner, layer = self.runs[self.run]
        self.run += 1
        if self.mode == "cas":
            clock = self.group.clock
            half = self.step_time.policy.requests(self.rows) * self.step_time.device.round_trip_s / 2
            answer = partial(self._reply, half, clock.now)
            clock.at(clock.now + half, self.group.gpus[owner].serve, layer, self.rows, answer)
        elif self.mode == "was":
            if self.copied > self.used:
                self._use_slot()
            else:
                self.wants_copy = True
        else:  # map: computed in place
            self.gpu.work(self.pooled_s, self._own_run)

    def _reply(self, half: float, sent: float) -> None:
        self.group.clock.at(self.group.clock.now + half, self._answered, sent)

    def _answered(self, sent: float) -> None:
        self.cas_wait_s += self.group.clock.now - sent
        self._own_run()

    def _copy_next(self) -> None:
        """The next borrowed layer's copy, once the stream is idle and a slot is free."""
        slots_full = self.copies - self.used >= self.step_time.slots
        if self.copying or slots_full or self.copies == len(self.borrowed):
            return
        self.copying = True
        owner = self.borrowed[self.copies]
        self.copies += 1
        link = self.group.links[owner]
        link.copy(self.step_time.pooled_bytes, partial(self._copied, self.group.clock.now))

    def _copied(self, started: float) -> None:
        self.copying, self.copied = False, self.copied + 1
        self.copy_s = self.group.clock.now - started
        if self.wants_copy:
            self.wants_copy = False
            self._use_slot()
        self._copy_next()

    def _use_slot(self) -> None:
        self.gpu.work(self.pooled_s, self._slot_used)

    def _slot_used(self) -> None:
        self.used += 1
        self._copy_next()
        self._own_run()


class Group:
    def __init__(
        self, cap: Capacity, engines: list[LLMEngine], step_times: list[StepTime], requests, learn: bool
    ):
        self.clock, self.learn = Clock(), learn
        self.pending = deque(enumerate(requests))
        self.members = []
        for rank, (engine, timing) in enumerate(zip(engines, step_times, strict=True)):
            borrows = cap.placement is not None and timing.remote_layers
            owners = cap.placement.owners if borrows else (rank,) * timing.num_layers
            self.members.append(Member(self, rank, engine, timing, owners))
        self.gpus = [m.gpu for m in self.members]
        self.links = [Link(self.clock, timing.device.link_bw) for timing in step_times]


def simulate_group(
    spec: ModelSpec,
    cap: Capacity,
    step_times: list[StepTime],
    requests: list[Request],
    max_num_seqs: int,
    max_num_batched_tokens: int,
    learn: bool = True,
) -> Prediction:
    """The group on one clock; the same requests, memory plans and step-time model as `simulate`.
    learn=False keeps each replica's policy at its start-up calibration."""
    runners = [ShapeRunner() for _ in step_times]
    engines = planned_engines(spec, cap, runners, requests, max_num_seqs, max_num_batched_tokens)
    group = Group(cap, engines, step_times, requests, learn)
    for member in group.members:
        group.clock.at(0.0, member.step)
    group.clock.run()
    result = prediction(requests, engines, step_times, [m.finished_at for m in group.members])
    gpus = group.gpus
    passes = sum(g.passes for g in gpus)
    result.group = {
        "cas_passes": passes,
        "requests_per_pass": round(sum(g.requests for g in gpus) / passes, 2) if passes else None,
        "serving_share": round(sum(g.serving_s for g in gpus) / (len(gpus) * result.elapsed_s), 4),
    }
    return result
