"""The planner's model checked here: each configuration `sidp bench` ran, predicted by the engine's
scheduler on the same requests and memory plans, with steps priced on this CPU as measured."""

from __future__ import annotations

from dataclasses import asdict

import torch

from sidp.bench.workload import Request
from sidp.plan.capacity import Capacity, Layout
from sidp.plan.hardware import Device
from sidp.plan.simulate import replica_step_times, simulate


class Predictor:
    """Measures this CPU once (at the first configuration) and predicts each configuration's run."""

    def __init__(self) -> None:
        self.device: Device | None = None

    def __call__(self, llm, requests: list[Request]) -> dict:
        if self.device is None:
            from sidp.plan.cpu_device import measure_cpu

            replicas = len(llm.plans)
            threads = max(1, torch.get_num_threads() // replicas)  # as the group gives each replica
            self.device = measure_cpu(llm.config, llm.spec, threads, siblings=replicas - 1)
        return predict_run(llm, requests, self.device)


def predict_run(llm, requests: list[Request], device: Device) -> dict:
    """Predicted mean step time and elapsed time of `llm` (an open LLM) running `requests`."""
    config = llm.config
    parts = config.pooled_parts if config.placement else frozenset()
    layout = Layout(len(llm.plans), 1, parts, config.sidp_mode)
    cap = Capacity(layout, list(llm.plans), config.placement)
    step_times = replica_step_times(llm.spec, device, cap, config.cache_slots, config.dtype.itemsize)
    p = simulate(llm.spec, cap, step_times, requests, config.max_num_seqs, config.max_num_batched_tokens)
    busy = sum(p.elapsed_by_replica)
    return {
        "elapsed_s": p.elapsed_s,
        "step_ms": busy / p.steps * 1e3,
        "steps": p.steps,
        "steps_by_mode": p.modes,
    }


def compare(result: dict, predicted: dict, replicas: int) -> dict:
    """Measured mean step time: the replicas' wall time over their steps (each replica is busy the
    whole run but for its tail)."""
    measured_step_ms = result["elapsed_s"] * replicas / result["num_steps"] * 1e3
    return {
        "label": f"{result['budget']} {result['label']}" if "budget" in result else result["label"],
        "measured_step_ms": round(measured_step_ms, 2),
        "predicted_step_ms": round(predicted["step_ms"], 2),
        "step_error": predicted["step_ms"] / measured_step_ms - 1,
        "measured_elapsed_s": round(result["elapsed_s"], 2),
        "predicted_elapsed_s": round(predicted["elapsed_s"], 2),
        "elapsed_error": predicted["elapsed_s"] / result["elapsed_s"] - 1,
        "measured_steps": result["num_steps"],
        "predicted_steps": predicted["steps"],
    }


def calibration_table(rows: list[dict], device: Device) -> str:
    lines = [
        f"cost model on {device.name}: {device.flops / 1e9:.0f} GFLOP/s, {device.mem_bw / 1e9:.1f} GB/s "
        f"streaming, {device.link_bw / 1e9:.1f} GB/s copy, {device.round_trip_s * 1e6:.0f} us round trip, "
        f"{device.layer_overhead_s * 1e6:.0f} us per layer",
        f"{'config':<26} {'step ms':>8} {'predicted':>10} {'error':>7} {'elapsed s':>10} {'predicted':>10} "
        f"{'error':>7} {'steps':>7} {'predicted':>10}",
    ]
    for r in rows:
        lines.append(
            f"{r['label']:<26} {r['measured_step_ms']:>8.2f} {r['predicted_step_ms']:>10.2f} "
            f"{r['step_error']:>+7.0%} {r['measured_elapsed_s']:>10.2f} {r['predicted_elapsed_s']:>10.2f} "
            f"{r['elapsed_error']:>+7.0%} {r['measured_steps']:>7} {r['predicted_steps']:>10}"
        )
    within = sum(abs(r["step_error"]) <= 0.2 for r in rows)
    lines.append(f"step time predicted within 20% for {within} of {len(rows)} configurations")
    return "\n".join(lines)


def calibration_report(results: list[dict], device: Device, replicas: int) -> dict:
    """Predicted against measured for every configuration that ran; printed, and returned for the JSON."""
    rows = [compare(r, r["predicted"], replicas) for r in results if r.get("predicted")]
    print(f"\n{calibration_table(rows, device)}")
    return {"device": asdict(device), "rows": rows}
