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
    """Replicas pull requests as the real ones do (when their scheduler has room); whichever replica's
    clock is earliest acts next, so the shared queue is drained in time order."""
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
        eos_token_ids=(),
        enable_prefix_caching=False,  # the planner's prompts are placeholders, not text to share
    )
    runners = [PredictedRunner(t) for t in step_times]
    engines = [LLMEngine(config, spec, plan, runner=r) for plan, r in zip(cap.plans, runners, strict=True)]
    pending = deque(enumerate(requests))
    active = set(range(len(engines)))
    while active:
        rank = min(active, key=lambda r: runners[r].clock)
        engine = engines[rank]
        while pending and engine.wants_requests():
            seq_id, request = pending.popleft()
            params = SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True)
            engine.add_request(seq_id, request.prompt_token_ids, params)
        if engine.has_work():
            engine.step()
        else:
            active.discard(rank)
    elapsed = max(r.clock for r in runners)
    modes = sum((t.modes for t in step_times), Counter())
    return Prediction(
        elapsed_s=elapsed,
        elapsed_by_replica=[r.clock for r in runners],
        output_tokens_per_s=sum(r.output_len for r in requests) / elapsed,
        steps=sum(e.num_steps for e in engines),
        preemptions=sum(e.scheduler.num_preemptions for e in engines),
        modes=dict(modes),
    )
