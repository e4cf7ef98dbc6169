"""Memory per GPU for plain DP and SiDP: the engine's own ledger (sidp.memory), applied to one GPU's
tensor-parallel share of the model, for every rank of the group (ranks can hold different layers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sidp.engine_args import replica_ledgers
from sidp.errors import SidpError
from sidp.memory import MemoryPlan
from sidp.model.spec import ModelSpec
from sidp.plan.hardware import Device
from sidp.plan.models import tensor_shard
from sidp.pool.placement import PARTS, Placement

BLOCK_SIZE = 16
MAX_NUM_SEQS = 1024  # offline throughput settings for large GPUs (our choice; vLLM's default is 256)
MAX_NUM_BATCHED_TOKENS = 8192


@dataclass(frozen=True, slots=True)
class Layout:
    dp: int
    tp: int = 1
    parts: frozenset[str] = frozenset()  # pooled parts; empty: plain DP
    mode: str = "auto"

    @property
    def label(self) -> str:
        return "sidp " + ",".join(p for p in PARTS if p in self.parts) if self.parts else "dp"


@dataclass(slots=True)
class Capacity:
    layout: Layout
    plans: list[MemoryPlan]  # one per DP rank; empty when the model does not fit
    placement: Placement | None = None

    @property
    def fits(self) -> bool:
        return bool(self.plans)

    @property
    def kv_tokens_per_replica(self) -> int:
        """The tightest rank's: what every replica can count on."""
        return min((p.kv_tokens for p in self.plans), default=0)

    @property
    def kv_tokens_per_node(self) -> int:
        return sum(p.kv_tokens for p in self.plans)

    def concurrency(self, seq_len: int) -> int:
        """Sequences of seq_len tokens the node holds at once."""
        return sum(p.kv_tokens // seq_len for p in self.plans)

    @property
    def weight_bytes_per_gpu(self) -> int:
        return max((p.weight_total for p in self.plans), default=0)


def capacity(
    spec: ModelSpec,
    device: Device,
    layout: Layout,
    cache_slots: int = 2,
    max_num_seqs: int = MAX_NUM_SEQS,
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS,
) -> Capacity:
    shard = tensor_shard(spec, layout.tp)
    placement = Placement.build(spec.num_layers, layout.dp) if layout.parts else None
    limits = (BLOCK_SIZE, max_num_batched_tokens, max_num_seqs)
    try:
        plans, _ = replica_ledgers(
            shard,
            torch.bfloat16,
            device.memory_bytes,
            limits,
            layout.dp,
            placement,
            layout.parts,
            layout.mode,
            cache_slots,
            device.kind,
        )
    except SidpError:  # the weights alone do not fit this GPU
        return Capacity(layout, [], placement)
    return Capacity(layout, plans, placement)
