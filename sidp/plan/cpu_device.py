"""This CPU as a roofline device, measured in a few seconds, so the planner's model can be checked
against steps sidp really ran here (`sidp bench --predict`).

Measured with the pool's own calibration on one layer's real weights: FLOP/s from the MLP at 256
rows, streaming bandwidth from it at one row, the copy of a layer (WaS), a round trip through a
pipe to another process (CaS); and the costs the roofline cannot see (Python, small kernels), per
layer and per sequence, from real decode steps of the whole model with 1 and 16 sequences.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import replace
from functools import partial

import torch

from sidp.config import EngineConfig
from sidp.engine.llm_engine import LLMEngine
from sidp.memory import MemoryPlan, layer_weight_bytes
from sidp.model.checkpoint import open_checkpoint
from sidp.model.decoder import project, read_part
from sidp.model.linear import compute_dtype
from sidp.model.spec import ModelSpec
from sidp.plan.hardware import Device
from sidp.plan.step_time import StepTime
from sidp.pool.policy import calibrate
from sidp.pool.transport import transport_for
from sidp.sampling_params import SamplingParams

CONTEXT = 128  # tokens of the sequence whose decode steps measure the overhead
DECODE_STEPS = 8
MANY = 16  # sequences in the second decode measurement
ROWS = 256  # rows at which the MLP's FLOP/s is read (one row gives its streaming bandwidth)
REPEATS = 5  # best of: with a sibling loading the machine, fewer runs read its noise as the CPU's speed


def measure_cpu(config: EngineConfig, spec: ModelSpec, threads: int, siblings: int = 0) -> Device:
    """This CPU with `threads` threads per replica, while `siblings` other processes multiply as the
    group's other replicas would (they share the memory system); the caller's thread count is kept."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")  # fork could copy a busy OpenMP pool
    ready, stop = context.Barrier(siblings + 1), context.Event()
    busy = [
        context.Process(target=_sibling, args=(spec, config.dtype, threads, ready, stop), daemon=True)
        for _ in range(siblings)
    ]
    try:
        for process in busy:
            process.start()
        ready.wait(timeout=120)
        return _measure(config, spec, threads, siblings)
    finally:
        stop.set()
        for process in busy:
            process.join(timeout=10)
        torch.set_num_threads(before)


def _sibling(spec: ModelSpec, dtype: torch.dtype, threads: int, ready, stop) -> None:
    """Another replica's load: a decode-sized MLP on random weights, over and over."""
    torch.set_num_threads(threads)
    h, f = spec.hidden_size, spec.intermediate_size
    weights = {"gate_up": torch.randn(2 * f, h).to(dtype), "down": torch.randn(h, f).to(dtype)}
    x = torch.randn(MANY, h, dtype=compute_dtype(dtype))
    ready.wait()
    with torch.inference_mode():
        while not stop.is_set():
            project("mlp", x, weights)


def _measure(config: EngineConfig, spec: ModelSpec, threads: int, siblings: int) -> Device:
    """The pool's own start-up calibration (sidp.pool.policy.calibrate) on layer 0's MLP, read as
    roofline figures; then what the roofline misses, from real decode steps."""
    dtype = config.dtype
    checkpoint = open_checkpoint(config.model)
    weights = read_part(lambda name: checkpoint.read(name, dtype), spec, 0, "mlp")
    weight_bytes = layer_weight_bytes(spec, dtype.itemsize)["mlp"]
    ours, theirs = multiprocessing.get_context("fork").Pipe()
    echo = multiprocessing.get_context("fork").Process(target=_echo, args=(theirs,), daemon=True)
    echo.start()
    try:
        measured = calibrate(
            spec,
            compute_dtype(dtype),
            weights,
            ("mlp",),
            ROWS,
            transport_for("cpu").copy_into,
            partial(_ping, ours),
            repeats=REPEATS,
        )
    finally:
        ours.send_bytes(b"")
        echo.join(timeout=5)
    device = Device(
        name=f"this CPU, {threads} thread{'s' * (threads > 1)}",
        memory_bytes=config.memory_per_replica,
        flops=2 * ROWS * (weight_bytes / dtype.itemsize) / measured.compute_s(ROWS),
        mem_bw=weight_bytes / measured.compute_s(1),
        link_bw=weight_bytes / measured.copy_s,
        round_trip_s=measured.round_trip_s,
        layer_overhead_s=0.0,
        kind="cpu",
    )
    # What the roofline misses, per layer: a part per step and a part per sequence, from decode steps
    # of one and of MANY sequences.
    beyond = {}
    for seqs in (1, MANY):
        step = StepTime(spec, device, dtype_bytes=dtype.itemsize)
        roofline = step.seconds(seqs, seqs, seqs * (CONTEXT + 1), seqs * (CONTEXT + 1))
        beyond[seqs] = max(0.0, _decode_step_s(config, spec, seqs) - roofline) / spec.num_layers
    per_seq = max(0.0, (beyond[MANY] - beyond[1]) / (MANY - 1))
    return replace(device, layer_overhead_s=max(0.0, beyond[1] - per_seq), seq_overhead_s=per_seq)


def _ping(channel) -> float:
    """A CaS header's trip to another process and back, as the pool's calibration times its pings."""
    started = time.perf_counter()
    channel.send_bytes(b"x" * 12)
    channel.recv_bytes()
    return time.perf_counter() - started


def _echo(channel) -> None:
    while data := channel.recv_bytes():
        channel.send_bytes(data)


def _decode_step_s(config: EngineConfig, spec: ModelSpec, seqs: int) -> float:
    """The fastest of a few decode steps of `seqs` sequences on the real model, after their prompts."""
    blocks = seqs * -(-(CONTEXT + DECODE_STEPS + 1) // config.block_size)
    block_bytes = spec.kv_bytes_per_token(config.dtype.itemsize) * config.block_size
    plan = MemoryPlan(blocks * block_bytes, {}, 0, config.block_size, block_bytes, blocks)
    engine = LLMEngine(config, spec, plan)
    params = SamplingParams(temperature=0, max_tokens=DECODE_STEPS + 1, ignore_eos=True)
    for seq_id in range(seqs):
        engine.add_request(seq_id, [1 + seq_id] * CONTEXT, params)
    while any(s.num_computed_tokens < CONTEXT for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # the prompts
    best = float("inf")
    while engine.has_work():
        started = time.perf_counter()
        engine.step()
        best = min(best, time.perf_counter() - started)
    return best
