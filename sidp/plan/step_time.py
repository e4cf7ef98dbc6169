"""Seconds one replica's step takes on a roofline device, for the planner and for checking it here.

A step runs every layer: the parts it holds (plain DP: all) as kernels bound by FLOPs or bytes, the
attention over its sequences' KV, and the pooled parts of layers owned elsewhere, priced by the pool's
own cost model (sidp.pool.policy: WaS, CaS, map; auto picks per step as the engine does). Then the LM
head, and with tensor parallelism two all-reduces per layer over the link.
"""

from __future__ import annotations

from collections import Counter

from sidp.engine.scheduler import ScheduledStep
from sidp.memory import layer_weight_bytes, piece_bytes
from sidp.model.decoder import ops_of
from sidp.model.spec import ModelSpec
from sidp.plan.hardware import Device
from sidp.plan.models import tensor_shard
from sidp.pool.policy import ROWS_GRID, Calibration, ModePolicy


class StepTime:
    def __init__(
        self,
        spec: ModelSpec,
        device: Device,
        tp: int = 1,
        parts: frozenset[str] = frozenset(),
        remote_layers: int = 0,
        mode: str = "auto",
        cache_slots: int = 2,
        embed_remote: bool = False,
        dtype_bytes: int = 2,
    ):
        """spec: the whole model; parts, remote_layers: what this replica borrows (none: plain DP);
        dtype_bytes: of weights, activations and KV (bf16 by default)."""
        self.dtype_bytes = dtype_bytes
        self.spec = shard = tensor_shard(spec, tp)
        self.device, self.tp, self.mode = device, tp, mode
        self.num_layers = spec.num_layers
        self.pooled_bytes = piece_bytes(shard, dtype_bytes, parts)
        self.held_bytes = sum(layer_weight_bytes(shard, dtype_bytes).values()) - self.pooled_bytes
        self.kv_bytes_per_token = 2 * shard.kv_size * dtype_bytes  # one layer's K and V
        self.head_bytes = shard.vocab_size * shard.hidden_size * dtype_bytes
        self.head_link_s = self.head_bytes / device.link_bw if embed_remote and mode != "map" else 0.0
        self.remote_layers = remote_layers
        self.policy = None
        # As the engine's pool prices it (sidp.pool.member): with two slots or more a copy runs under compute.
        self.slots = cache_slots
        if remote_layers:
            calibration = Calibration(
                copy_s=self.pooled_bytes / device.link_bw,
                round_trip_s=device.round_trip_s,
                compute=tuple((rows, self.pooled_s(rows)) for rows in ROWS_GRID),
            )
            self.policy = ModePolicy(calibration, remote_layers, len(ops_of(parts)), self.slots)
        self.modes: Counter[str] = Counter()

    def pooled_s(self, rows: int) -> float:
        """One layer's pooled ops on `rows` tokens."""
        return self.device.roofline_s(
            2 * rows * self.pooled_bytes / self.dtype_bytes, self.pooled_bytes, rows
        )

    def layer_s(self, tokens: int, seqs: int, attended: int, kv_read: int) -> float:
        """One layer's held part (all but its pooled part), for a step of `tokens` new tokens from `seqs`
        sequences whose queries meet `attended` keys in all and which read `kv_read` tokens of KV."""
        device, shard, dtype_bytes = self.device, self.spec, self.dtype_bytes
        params = self.held_bytes / dtype_bytes
        held_flops = 2 * tokens * params + 4 * shard.num_heads * shard.head_dim * attended
        held_bytes = self.held_bytes + kv_read * self.kv_bytes_per_token
        layer = (
            device.roofline_s(held_flops, held_bytes, tokens)
            + device.layer_overhead_s
            + seqs * device.seq_overhead_s
        )
        if self.tp > 1:  # two all-reduces of the hidden states per layer
            layer += 2 * (tokens * shard.hidden_size * dtype_bytes / device.link_bw + device.round_trip_s / 2)
        return layer

    def tail_s(self, seqs: int) -> float:
        """After the layers: the LM head over the step's last positions, and the step's own overhead."""
        device = self.device
        head = max(
            device.roofline_s(2 * seqs * self.head_bytes / self.dtype_bytes, self.head_bytes, seqs),
            self.head_link_s,
        )
        return head + device.step_overhead_s

    def choose(self, tokens: int) -> str | None:
        """The mode of a step's borrowed layers (None: it borrows none), counted in `modes`."""
        if not self.policy:
            return None
        mode = self.policy.choose(tokens) if self.mode == "auto" else self.mode
        self.modes[mode] += 1
        return mode

    def seconds(self, tokens: int, seqs: int, attended: int, kv_read: int) -> float:
        """A step on this replica alone: the borrowed layers priced by the pool's cost model."""
        owned = self.num_layers - self.remote_layers
        pooled = owned * self.pooled_s(tokens) if self.pooled_bytes else 0.0
        if mode := self.choose(tokens):
            pooled += self.policy.costs(tokens)[mode]
        return self.num_layers * self.layer_s(tokens, seqs, attended, kv_read) + pooled + self.tail_s(seqs)

    def of_step(self, step: ScheduledStep) -> float:
        return self.seconds(*step_shape(step))


def step_shape(step: ScheduledStep) -> tuple[int, int, int, int]:
    """(tokens, seqs, attended, kv_read) of a step, before it runs: each sequence's computed tokens are
    its context so far."""
    attended = kv_read = 0
    for seq, n in zip(step.seqs, step.num_new_tokens, strict=True):
        start = seq.num_computed_tokens
        attended += n * start + n * (n + 1) // 2
        kv_read += start + n
    return step.num_tokens, len(step.seqs), attended, kv_read


def next_tokens(step: ScheduledStep) -> list[int | None]:
    """Token 0 for every sequence that finishes its prompt in the step (the planner's requests ignore
    EOS), None for the others."""
    return [
        0 if seq.num_computed_tokens + n == seq.num_tokens else None
        for seq, n in zip(step.seqs, step.num_new_tokens, strict=True)
    ]


class PredictedRunner:
    """The engine's step runner when nothing is computed: each step is priced and the clock advanced."""

    def __init__(self, step_time: StepTime):
        self.step_time = step_time
        self.clock = 0.0

    def run(self, step: ScheduledStep) -> list[int | None]:
        self.clock += self.step_time.of_step(step)
        return next_tokens(step)
