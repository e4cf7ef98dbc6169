"""Predicted throughput: the engine's own scheduler, block manager and request pulling, run over a
workload with each step priced by the step-time model instead of computed. No second scheduler."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import torch

from sidp.bench.workload import Request
from sidp.config import EngineConfig
from sidp.engine.llm_engine import LLMEngine
from sidp.errors import SidpError
from sidp.model.spec import ModelSpec
from sidp.plan.capacity import Capacity
from sidp.plan.hardware import Device
from sidp.plan.step_time import PredictedRunner, StepTime
from sidp.sampling_params import SamplingParams


@dataclass(slots=True)
class Prediction:
    elapsed_s: float
    elapsed_by_replica: list[float]  # each replica's busy time
    output_tokens_per_s: float
    steps: int
    preemptions: int
    modes: dict[str, int]  # steps per mode, where layers are borrowed
    group: dict | None = None  # what the replicas met at their owners (sidp.plan.group), when modelled


def replica_step_times(
    spec: ModelSpec, device: Device, cap: Capacity, cache_slots: int = 2, dtype_bytes: int = 2
) -> list[StepTime]:
    layout, placement = cap.layout, cap.placement
    if placement is None:
        return [StepTime(spec, device, layout.tp, dtype_bytes=dtype_bytes) for _ in range(layout.dp)]
    return [
        StepTime(
            spec,
            device,
            layout.tp,
            layout.parts,
            len(placement.remote_for(rank)),
            layout.mode,
            cache_slots,
            embed_remote="embed" in layout.parts and placement.embed_owner != rank,
            dtype_bytes=dtype_bytes,
        )
        for rank in range(layout.dp)
    ]


def simulate(
    spec: ModelSpec,
    cap: Capacity,
    step_times: list[StepTime],
    requests: list[Request],
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> Prediction:
    """Each replica alone on its own clock, its borrowed layers priced by the pool's cost model (sidp
    .plan.group has the replicas meet at the owners). Replicas pull requests as the real ones do (when
    their scheduler has room); whichever replica's clock is earliest acts next, so the shared queue is
    drained in time order."""
    runners = [PredictedRunner(t) for t in step_times]
    engines = planned_engines(spec, cap, runners, requests, max_num_seqs, max_num_batched_tokens)
    pending = deque(enumerate(requests))
    active = set(range(len(engines)))
    while active:
        rank = min(active, key=lambda r: runners[r].clock)
        engine = engines[rank]
        hand_out(pending, engine)
        if engine.has_work():
            engine.step()
        else:
            active.discard(rank)
    return prediction(requests, engines, step_times, [r.clock for r in runners])


def planned_engines(
    spec: ModelSpec,
    cap: Capacity,
    runners: list,
    requests: list[Request],
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> list[LLMEngine]:
    """One engine per replica on its memory plan, each step run by its runner (nothing is computed)."""
    longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    if longest > cap.kv_tokens_per_replica:
        raise SidpError(
            f"A request of {longest} tokens does not fit a replica's KV cache "
            f"({cap.kv_tokens_per_replica:,} tokens) in {cap.layout.label}."
        )
    config = EngineConfig(
        model=Path("(planned)"),
        dtype=torch.bfloat16,
        max_model_len=longest,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        memory_per_replica=0,
        enable_prefix_caching=False,  # the planner's prompts are placeholders, not text to share
    )
    return [LLMEngine(config, spec, plan, runner=r) for plan, r in zip(cap.plans, runners, strict=True)]


def hand_out(pending: deque[tuple[int, Request]], engine: LLMEngine) -> None:
    """The shared queue's next requests, to a replica while its scheduler has room for them."""
    while pending and engine.wants_requests():
        seq_id, request = pending.popleft()
        params = SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True)
        engine.add_request(seq_id, request.prompt_token_ids, params)


def prediction(
    requests: list[Request], engines: list[LLMEngine], step_times: list[StepTime], finished: list[float]
) -> Prediction:
    elapsed = max(finished)
    return Prediction(
        elapsed_s=elapsed,
        elapsed_by_replica=finished,
        output_tokens_per_s=sum(r.output_len for r in requests) / elapsed,
        steps=sum(e.num_steps for e in engines),
        preemptions=sum(e.scheduler.num_preemptions for e in engines),
        modes=dict(sum((t.modes for t in step_times), Counter())),
    )
