"""The planner's model checked here: each configuration `sidp bench` ran, predicted by the engine's
scheduler on the same requests and memory plans, with steps priced on this CPU as measured.

A prediction is a hit when its mean step time is within 20% of the measured one and it borrows layers
the way the run did (each mode's share of the borrowing steps within 20 points). The device can be
measured by this bench or read from an earlier bench's JSON (`--predict-device`), so that what is fitted
(the overheads per layer, sequence and step, from decode steps) comes from another run than the one
scored."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from sidp.bench.workload import Request
from sidp.errors import SidpError
from sidp.plan.capacity import Capacity, Layout
from sidp.plan.hardware import Device
from sidp.plan.simulate import replica_step_times, simulate

HIT_ERROR = 0.2  # step time within 20%
MIX_POINTS = 0.2  # each mode's share of the borrowing steps within 20 points
MODES = ("was", "cas", "map")


class Predictor:
    """Measures this CPU once (at the first configuration), or takes `device` as given, and predicts
    each configuration's run."""

    def __init__(self, device: Device | None = None) -> None:
        self.device = device
        self.source = "given" if device else "measured by this bench"

    def __call__(self, llm, requests: list[Request]) -> dict:
        if self.device is None:
            from sidp.plan.cpu_device import measure_cpu

            replicas = len(llm.plans)
            threads = max(1, torch.get_num_threads() // replicas)  # as the group gives each replica
            self.device = measure_cpu(llm.config, llm.spec, threads, siblings=replicas - 1)
        return predict_run(llm, requests, self.device)


def predict_run(llm, requests: list[Request], device: Device) -> dict:
    """Predicted mean step time and elapsed time of `llm` (an open LLM) running `requests`, and the share
    of the predicted time that is the fitted overheads (the same prediction with them at zero)."""
    busy, p = _simulated(llm, requests, device)
    roofline_only, _ = _simulated(
        llm, requests, replace(device, layer_overhead_s=0.0, seq_overhead_s=0.0, step_overhead_s=0.0)
    )
    return {
        "elapsed_s": p.elapsed_s,
        "step_ms": busy / p.steps * 1e3,
        "steps": p.steps,
        "steps_by_mode": p.modes,
        "fitted_share": 1 - roofline_only / busy,
    }


def _simulated(llm, requests: list[Request], device: Device):
    config = llm.config
    parts = config.pooled_parts if config.placement else frozenset()
    layout = Layout(len(llm.plans), 1, parts, config.sidp_mode)
    cap = Capacity(layout, list(llm.plans), config.placement)
    step_times = replica_step_times(llm.spec, device, cap, config.cache_slots, config.dtype.itemsize)
    p = simulate(llm.spec, cap, step_times, requests, config.max_num_seqs, config.max_num_batched_tokens)
    return sum(p.elapsed_by_replica), p


def device_from_report(path) -> Device:
    """The device an earlier `sidp bench --predict` measured, from its JSON."""
    try:
        measured = json.loads(Path(path).read_text(encoding="utf-8"))["calibration"]["device"]
        known = {f.name for f in fields(Device)}  # an older run may have recorded fields since dropped
        return Device(**{k: v for k, v in measured.items() if k in known})
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SidpError(
            f"Cannot read a measured device from {path} ({error}); "
            "give the JSON of a `sidp bench --predict` run."
        ) from None


def mode_shares(steps_by_mode: dict[str, int]) -> dict[str, float]:
    """Each mode's share of the steps that borrowed layers (empty where none did)."""
    borrowed = sum(steps_by_mode.get(m, 0) for m in MODES)
    return {m: steps_by_mode.get(m, 0) / borrowed for m in MODES} if borrowed else {}


def mix_matches(measured: dict[str, float], predicted: dict[str, float]) -> bool:
    if not measured or not predicted:
        return not measured and not predicted
    return all(abs(measured[m] - predicted[m]) <= MIX_POINTS for m in MODES)


def compare(result: dict, predicted: dict, replicas: int) -> dict:
    """Measured mean step time: the replicas' wall time over their steps (each replica is busy the
    whole run but for its tail)."""
    measured_step_ms = result["elapsed_s"] * replicas / result["num_steps"] * 1e3
    counters = result["counters"]
    measured_mix = mode_shares({m: counters.get(f"steps_{m}", 0) for m in MODES})
    predicted_mix = mode_shares(predicted["steps_by_mode"])
    step_error = predicted["step_ms"] / measured_step_ms - 1
    mix = mix_matches(measured_mix, predicted_mix)
    return {
        "label": f"{result['budget']} {result['label']}" if "budget" in result else result["label"],
        "measured_step_ms": round(measured_step_ms, 2),
        "predicted_step_ms": round(predicted["step_ms"], 2),
        "step_error": step_error,
        "measured_elapsed_s": round(result["elapsed_s"], 2),
        "predicted_elapsed_s": round(predicted["elapsed_s"], 2),
        "elapsed_error": predicted["elapsed_s"] / result["elapsed_s"] - 1,
        "measured_steps": result["num_steps"],
        "predicted_steps": predicted["steps"],
        "measured_mode_shares": measured_mix,
        "predicted_mode_shares": predicted_mix,
        "mode_mix_matches": mix,
        "fitted_share": predicted["fitted_share"],
        "hit": abs(step_error) <= HIT_ERROR and mix,
    }


def calibration_table(rows: list[dict], device: Device, source: str) -> str:
    lines = [
        f"cost model on {device.name} ({source}): {device.flops / 1e9:.0f} GFLOP/s, "
        f"{device.mem_bw / 1e9:.1f} GB/s streaming, {device.link_bw / 1e9:.1f} GB/s copy, "
        f"{device.round_trip_s * 1e6:.0f} us round trip, {device.layer_overhead_s * 1e6:.0f} us per layer",
        f"{'config':<26} {'step ms':>8} {'predicted':>10} {'error':>7} {'steps':>7} {'predicted':>10} "
        f"{'modes (W/C/M)':>15} {'predicted':>15} {'fitted':>7} {'hit':>4}",
    ]
    for r in rows:
        lines.append(
            f"{r['label']:<26} {r['measured_step_ms']:>8.2f} {r['predicted_step_ms']:>10.2f} "
            f"{r['step_error']:>+7.0%} {r['measured_steps']:>7} {r['predicted_steps']:>10} "
            f"{_mix(r['measured_mode_shares']):>15} {_mix(r['predicted_mode_shares']):>15} "
            f"{r['fitted_share']:>7.0%} {'yes' if r['hit'] else 'no':>4}"
        )
    hits = sum(r["hit"] for r in rows)
    lines.append(
        f"hits (step time within 20% and the same mode mix): {hits} of {len(rows)} configurations; "
        f"step time predicted within 20% for {sum(abs(r['step_error']) <= HIT_ERROR for r in rows)}"
    )
    return "\n".join(lines)


def _mix(shares: dict[str, float]) -> str:
    return "/".join(f"{shares[m]:.0%}" for m in MODES) if shares else "-"


def calibration_report(results: list[dict], predictor: Predictor, replicas: int) -> dict:
    """Predicted against measured for every configuration that ran; printed, and returned for the JSON."""
    rows = [compare(r, r["predicted"], replicas) for r in results if r.get("predicted")]
    print(f"\n{calibration_table(rows, predictor.device, predictor.source)}")
    return {"device": asdict(predictor.device), "device_source": predictor.source, "rows": rows}
