"""Auto mode: for each step, WaS or CaS, whichever a cost model calibrated on this machine says is faster.

Per remote layer, WaS costs max(compute, copy): the prefetcher copies the layer while earlier ones
compute, so only a copy slower than the compute shows (with a single slot nothing overlaps: compute
plus copy). CaS costs compute (done by the owner) plus, per request, a round trip and whatever the
owner's queue adds. Start-up calibration measures the copy of
one layer, the pooled ops' compute time against rows, and an empty round trip; during the run the
copy time and the per-request overhead are refined from what the steps actually saw.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sidp.model.decoder import Weights, project
from sidp.pool.cas import CAS_ROWS, op_widths
from sidp.pool.weight_cache import copy_piece

ROWS_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
LEARNING_RATE = 0.2  # weight of the newest observation in the running estimates


@dataclass(slots=True)
class Calibration:
    copy_s: float  # one layer's pooled weights, peer view into a slot
    round_trip_s: float  # an empty CaS request and its answer
    compute: tuple[tuple[int, float], ...]  # (rows, seconds) for one layer's pooled ops

    def compute_s(self, rows: int) -> float:
        """Interpolated between the measured row counts, linear in rows past the largest."""
        points = self.compute
        if rows >= points[-1][0]:
            return points[-1][1] * rows / points[-1][0]
        for (r0, t0), (r1, t1) in zip(points, points[1:], strict=False):
            if rows <= r1:
                return t0 + (t1 - t0) * (max(rows, r0) - r0) / (r1 - r0)
        return points[0][1]


def best_of(repeats: int, run: Callable[[], object]) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def _run_ops(inputs: dict[str, torch.Tensor], piece: Weights) -> None:
    for op, x in inputs.items():
        project(op, x, piece)


def calibrate(
    spec,
    dtype: torch.dtype,
    piece: Weights,
    ops: tuple[str, ...],
    max_rows: int,
    copy_into,
    ping,
    repeats: int = 2,
) -> Calibration:
    """Measure on this machine, now: copying `piece`, running `ops` on it, and `ping()`'s round trip;
    each time the best of `repeats` runs (of one more for the copy)."""
    slot = {name: torch.empty_like(t) for name, t in piece.items()}
    copy_s = best_of(repeats + 1, functools.partial(copy_piece, copy_into, slot, piece))
    del slot
    in_width, _ = op_widths(spec)
    compute = []
    with torch.inference_mode():
        for rows in (r for r in ROWS_GRID if r <= max(max_rows, 1)):
            inputs = {op: torch.randn(rows, in_width[op], dtype=dtype) for op in ops}
            compute.append((rows, best_of(repeats, functools.partial(_run_ops, inputs, piece))))
    round_trips = sorted(ping() for _ in range(21))
    return Calibration(copy_s, round_trips[len(round_trips) // 2], tuple(compute))


class ModePolicy:
    def __init__(self, calibration: Calibration, remote_layers: int, ops_per_layer: int, slots: int = 2):
        self.calibration = calibration
        self.overlap = slots > 1  # a second slot lets the next copy run under this layer's compute
        self.remote_layers = remote_layers
        self.ops_per_layer = ops_per_layer
        self.copy_s = calibration.copy_s
        self.request_overhead_s = calibration.round_trip_s  # round trip plus owner queueing, learnt

    def requests(self, rows: int) -> int:
        """CaS requests per borrowed layer: one per pooled op and chunk of CAS_ROWS rows."""
        return self.ops_per_layer * math.ceil(rows / CAS_ROWS)

    def costs(self, rows: int) -> dict[str, float]:
        """Predicted seconds the step's remote layers cost in each mode ("map": computed in place)."""
        compute = self.calibration.compute_s(rows)
        return {
            "map": self.remote_layers * compute,
            "was": self.remote_layers
            * (max(compute, self.copy_s) if self.overlap else compute + self.copy_s),
            "cas": self.remote_layers * (compute + self.requests(rows) * self.request_overhead_s),
        }

    def choose(self, rows: int) -> str:
        costs = self.costs(rows)
        return "cas" if costs["cas"] < costs["was"] else "was"

    def observe_copy(self, seconds: float) -> None:
        self.copy_s += LEARNING_RATE * (seconds - self.copy_s)

    def observe_cas(self, rows: int, waited_s: float) -> None:
        """A CaS step waited `waited_s` on its owners in all: learn the overhead beyond the compute."""
        per_layer = waited_s / self.remote_layers - self.calibration.compute_s(rows)
        overhead = max(0.0, per_layer / self.requests(rows))
        self.request_overhead_s += LEARNING_RATE * (overhead - self.request_overhead_s)
