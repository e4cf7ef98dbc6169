"""The machines the planner predicts for, as roofline devices: datasheet GPUs (sidp/data/plan/gpus.json)
scaled by the fractions real kernels reach, a custom GPU from four figures, or this CPU as measured."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from sidp.errors import SidpError

# Assumptions, not measurements (no GPU here): what kernels reach of the datasheet figures.
ACHIEVED_FLOPS = 0.6  # dense bf16 GEMM at large batch
ACHIEVED_HBM = 0.8  # streaming weights and KV
ACHIEVED_LINK = 0.7  # a peer copy over NVLink, of one direction's bandwidth
GPU_ROUND_TRIP_S = 20e-6  # a CaS request and its answer: a signal each way and a kernel launch
GPU_LAYER_OVERHEAD_S = 10e-6  # kernel launches per decoder layer and step beyond the roofline
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of GPU memory for weights, activations and KV
# A sensitivity assumption, off unless asked for (`Device.half_speed_rows`): a step's kernels on few rows
# reach only rows / (rows + SMALL_BATCH_HALF_ROWS) of the roofline's speed (half of it at this many rows),
# as launches, tiles and ramps that the roofline does not see weigh more in small steps. At 64 rows a
# decode step of 58 sequences runs at 48% of the roofline, one of 95 at 60%, a 2,048-token chunk at 97%.
SMALL_BATCH_HALF_ROWS = 64


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    memory_bytes: int  # what one replica (per GPU) may use
    flops: float  # achieved dense FLOP/s in the model's dtype
    mem_bw: float  # achieved bytes/s from the device's own memory
    link_bw: float  # achieved bytes/s to or from a peer, one direction
    round_trip_s: float  # an empty CaS request and its answer
    layer_overhead_s: float  # per decoder layer and step, beyond the roofline
    seq_overhead_s: float = 0.0  # per decoder layer and sequence in the step, beyond the roofline
    step_overhead_s: float = 0.0  # per step: scheduling, sampling, what the roofline does not see
    kind: str = "cuda"  # "cuda" or "cpu": how the ledger counts activations (sidp.memory)
    half_speed_rows: float = 0.0  # rows at which a kernel reaches half the roofline (0: all of it, always)

    def roofline_s(self, flops: float, bytes_: float, rows: int = 0) -> float:
        """A kernel is bound by its arithmetic or by the bytes it moves, whichever takes longer; on `rows`
        rows it reaches rows / (rows + half_speed_rows) of that speed."""
        seconds = max(flops / self.flops, bytes_ / self.mem_bw)
        if self.half_speed_rows and rows:
            seconds *= 1 + self.half_speed_rows / rows
        return seconds


def gpu_specs() -> dict[str, dict]:
    text = resources.files("sidp").joinpath("data/plan/gpus.json").read_text(encoding="utf-8")
    return {name: figures for name, figures in json.loads(text).items() if not name.startswith("_")}


def gpu(
    name: str | None = None,
    *,
    memory_gib: float | None = None,
    hbm_tb_s: float | None = None,
    bf16_tflops: float | None = None,
    nvlink_gb_s: float | None = None,
) -> Device:
    """A built-in GPU by name, with any figure overridden; or, with no name, a custom one from all four.
    nvlink_gb_s is the datasheet's bidirectional aggregate, as vendors quote it."""
    specs = gpu_specs()
    if name is not None and name not in specs:
        raise SidpError(f"Unknown GPU {name!r}: use one of {', '.join(specs)}, or give its four figures.")
    base = specs.get(name, {})
    figures = {
        "memory_gib": memory_gib if memory_gib is not None else base.get("memory_gib"),
        "hbm_tb_s": hbm_tb_s if hbm_tb_s is not None else base.get("hbm_tb_s"),
        "bf16_tflops": bf16_tflops if bf16_tflops is not None else base.get("bf16_tflops"),
        "nvlink_gb_s": nvlink_gb_s if nvlink_gb_s is not None else base.get("nvlink_gb_s"),
    }
    missing = [k for k, v in figures.items() if v is None]
    if missing:
        raise SidpError(f"A custom GPU needs {', '.join('--' + k.replace('_', '-') for k in missing)}.")
    if min(figures.values()) <= 0:
        raise SidpError(f"GPU figures must be positive, got {figures}.")
    return Device(
        name=name or "custom",
        memory_bytes=int(figures["memory_gib"] * 2**30 * GPU_MEMORY_UTILIZATION),
        flops=figures["bf16_tflops"] * 1e12 * ACHIEVED_FLOPS,
        mem_bw=figures["hbm_tb_s"] * 1e12 * ACHIEVED_HBM,
        link_bw=figures["nvlink_gb_s"] / 2 * 1e9 * ACHIEVED_LINK,
        round_trip_s=GPU_ROUND_TRIP_S,
        layer_overhead_s=GPU_LAYER_OVERHEAD_S,
    )
