"""`sidp bench`: time sidp on a workload, then transformers on the same one (and vLLM first, with
--peer vllm), and write the numbers.

Timing follows vLLM's benchmark_throughput: the model is loaded first, the clock covers generation only,
and the printed line has vLLM's wording. Results are a list of engine runs so that sidp configurations
(data-parallel replicas, SiDP modes, memory budgets) sit beside the baseline in one report.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sidp.bench import peer, sweep
from sidp.bench.modes import config_arguments, parse_configs, probe_summary, totals
from sidp.bench.report import (
    add_ratios,
    machine_info,
    machine_line,
    print_side_by_side,
    workload_stats,
)
from sidp.bench.resident import PeakPss
from sidp.bench.workload import (
    SHAPES,
    Request,
    Workload,
    build_workload,
    random_workload,
    rates,
    throughput_line,
)
from sidp.config import resolve_dtype
from sidp.engine_args import add_engine_arguments, llm_from_args
from sidp.errors import DoesNotFit, SidpError
from sidp.model.checkpoint import load_tokenizer, read_config
from sidp.model.spec import ModelSpec
from sidp.plan.calibration import Predictor, calibration_report, device_from_report

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("sidp")

WARMUP_OUTPUT_LEN = 32  # warmup only has to pay one-time costs, not rehearse the whole workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, dtype="bfloat16")
    parser.add_argument(
        "--workload",
        default="random",
        help=f"random (--input-len, --output-len), {', '.join(SHAPES)} (the SiDP paper's fixed prompt "
        "lengths, times --scale), or PATH.jsonl of {prompt | messages, max_tokens} lines",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiplies the fixed shapes' lengths (0.125 on a CPU: 128/256/512 prompt, 32 output tokens)",
    )
    parser.add_argument(
        "--num-requests",
        type=int,
        default=64,
        help="requests to draw (a .jsonl workload runs each of its lines once)",
    )
    parser.add_argument("--input-len", default="100:400", help="prompt tokens, LOW:HIGH inclusive, or N")
    parser.add_argument("--output-len", default="64:256", help="output tokens, LOW:HIGH inclusive, or N")
    parser.add_argument("--seed", type=int, default=0, help="the workload depends on this alone")
    parser.add_argument("--baseline", choices=("transformers", "none"), default="transformers")
    parser.add_argument(
        "--hf-batch-sizes",
        default="8,16,32,64",
        help="transformers batch sizes to probe; the fastest runs the full workload",
    )
    parser.add_argument(
        "--peer", choices=tuple(peer.RUNNERS), help="also run this engine first on the same requests"
    )
    parser.add_argument("--peer-python", help="with --peer vllm: the python of a venv that has vLLM")
    parser.add_argument("--out", type=Path, default=Path("bench-results/throughput.json"), help="JSON report")
    parser.add_argument("--warmup", type=int, default=4, help="requests run through sidp before timing")
    parser.add_argument(
        "--configs",
        default="dp,was,cas,auto,map",
        help="with --dp > 1: the group configurations run side by side (dp = plain data parallelism; "
        "a SiDP mode may pool other parts than --pooled-parts: map:mlp+attn+embed)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the configurations (and the peer) this many times, order reversed each time",
    )
    parser.add_argument(
        "--probe-every",
        type=int,
        default=0,
        help="SiDP auto: every k-th step is timed in both modes, alternately (checks the policy)",
    )
    parser.add_argument(
        "--predict",
        action="store_true",
        help="also predict each configuration with sidp plan's cost model, measured on this CPU",
    )
    parser.add_argument(
        "--predict-device",
        type=Path,
        metavar="JSON",
        help="with --predict: price steps with the device an earlier --predict run measured (its JSON), "
        "so that the scored runs are not the ones it was fitted on",
    )
    sweep.add_arguments(parser)


def run(args: argparse.Namespace) -> dict:
    input_len = parse_range(args.input_len, "--input-len")
    output_len = parse_range(args.output_len, "--output-len")
    hf_batch_sizes = parse_sizes(args.hf_batch_sizes)
    if args.warmup < 0:
        raise SidpError(f"--warmup must be 0 or more, got {args.warmup}.")
    if args.rounds < 1:
        raise SidpError(f"--rounds must be at least 1, got {args.rounds}.")
    configs = parse_configs(args.configs) if args.dp > 1 else ["sidp"]
    budgets = sweep.sweep_budgets(args)
    plot = (args.plot or args.out.with_suffix(".png")) if budgets else None
    for path in (args.out, plot):  # fail before minutes of benchmarking, not after
        if path is not None:
            _prepare_out(path)
    if args.peer_python and not args.peer:
        raise SidpError("--peer-python is the peer's python: add --peer vllm.")
    if args.peer and budgets:
        raise SidpError("--peer runs once beside one set of configurations; drop --sweep or --peer.")
    if args.peer:
        peer.check_python(args.peer_python)
    loadavg_before = os.getloadavg()
    if args.predict_device and not args.predict:
        raise SidpError("--predict-device is the device --predict prices steps with: add --predict.")
    device = device_from_report(args.predict_device) if args.predict_device else None
    predict = Predictor(device) if args.predict else None

    model_path, tokenizer, spec, dtype = _model(args)
    workload, warmup = _workloads(args, input_len, output_len, tokenizer, spec)
    requests = workload.requests

    dtype_name = str(dtype).removeprefix("torch.")
    results = []
    if budgets:
        results += sweep.sweep_memory(
            budgets,
            lambda budget: run_configs(
                argparse.Namespace(**{**vars(args), "memory_per_replica": budget}),
                configs,
                requests,
                warmup,
                heading=f"{budget} ",
                predict=predict,
            ),
        )
    else:
        run_peer = None
        if args.peer:  # a configuration of its own, in the same rounds as sidp's

            def run_peer() -> dict:
                return peer.run_peer(args.peer, args.peer_python, model_path, dtype_name, requests, warmup)

        results += run_configs(args, configs, requests, warmup, predict=predict, run_peer=run_peer)
    if args.baseline == "transformers":
        results.append(run_baseline(model_path, requests, dtype, hf_batch_sizes))
    add_ratios(results, args.peer)
    machine = machine_info(loadavg_before)
    if budgets:
        points = [r for r in results if r["engine"] == "sidp"]
        about = f"{args.dp} replica(s), pooling {args.pooled_parts}, workload {workload.name}"
        print(f"\nmemory sweep: {about}\n{sweep.sweep_table(points)}\n\n{machine_line(machine)}")
        sweep.plot_sweep(points, plot, f"{model_path.name}: {about} (scale {workload.scale})")
        print(f"drew {plot}")
    else:
        print_side_by_side(args, configs, results, machine)

    report = {
        # As typed (`sidp bench ...`), the home folder as ~: the report is meant to be shared and committed.
        "command": " ".join(["sidp", *(home_as_tilde(a) for a in sys.argv[1:])]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            k: home_as_tilde(str(v)) if isinstance(v, (str, Path)) else v
            for k, v in vars(args).items()
            if k != "func"
        },
        "model": home_as_tilde(str(model_path)),
        "dtype": dtype_name,
        "workload": workload_stats(workload, args.seed, len(warmup)),
        "results": results,
        "ratio": next(r for r in results if r["engine"] == "sidp")["vs_transformers"],
        "machine": machine,
    }
    if predict and predict.device:
        report["calibration"] = calibration_report(results, predict, args.dp)
    if budgets:
        report["sweep"] = {
            "over": "memory_per_replica",
            "budgets": [size for _, size in budgets],
            "plot": str(plot),
        }
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return report


def home_as_tilde(text: str) -> str:
    home = str(Path.home())
    return "~" + text[len(home) :] if text == home or text.startswith(home + os.sep) else text


def run_configs(
    args: argparse.Namespace,
    configs: list[str],
    requests: list[Request],
    warmup: list[Request],
    heading: str = "",
    predict: Callable | None = None,
    run_peer: Callable[[], dict] | None = None,
) -> list[dict]:
    """Each configuration on the same workload, one group at a time. With a `heading` (a sweep's budget)
    a configuration the budget is too small for is recorded as not fitting and the others go on; without
    one, that stops the benchmark. run_peer: the peer engine's run, first in the first round."""
    order = [args.peer, *configs] if run_peer else configs
    runs: dict[str, list[dict]] = {label: [] for label in order}
    misfits: dict[str, str] = {}
    for round_ in range(args.rounds):  # A B C, then C B A, ...: drift in the machine hits all alike
        for label in order if round_ % 2 == 0 else order[::-1]:
            if label in misfits:
                continue
            if run_peer and label == args.peer:
                runs[label].append(run_peer())
                continue
            try:
                llm = _start(args, label, requests)
            except DoesNotFit as error:  # any other error at start-up is not the budget's
                if not heading:
                    raise
                misfits[label] = str(error)
                print(f"{heading}{label}: does not fit: {error}")
                continue
            runs[label].append(run_sidp(llm, requests, warmup, label))
            if predict and round_ == args.rounds - 1:  # the same every round; the last is the one kept
                runs[label][-1]["predicted"] = predict(llm, requests)
            line = throughput_line(runs[label][-1])
            print(f"{heading}{label}: {line}" if heading or len(configs) > 1 or args.rounds > 1 else line)
            llm.close()
            llm = None  # give back the KV cache before the next configuration (or transformers) loads
            gc.collect()
    return [
        {**_mean_of_rounds(runs[label]), "fits": True}
        if runs[label]
        else {"engine": "sidp", "label": label, "fits": False, "error": misfits[label]}
        for label in order
    ]


def _start(args: argparse.Namespace, label: str, requests: list[Request]):
    """The LLM of one configuration, once it is known to hold the workload's longest request. Each replica,
    a lone one too, runs in a process of its own, whose memory is measured apart from the bench's."""
    llm = llm_from_args(args, replica_process=True, **config_arguments(label))
    try:
        _check_fits(requests, llm.max_model_len)
    except SidpError:
        llm.close()
        raise
    return llm


def _model(args: argparse.Namespace) -> tuple[Path, PreTrainedTokenizerBase, ModelSpec, torch.dtype]:
    """The checkpoint's path, tokenizer, shape and dtype, read without starting an engine: at a sweep's
    smallest budget no configuration may start, yet the workload must be the same at every budget."""
    if args.model is None:
        from sidp.model.default_model import default_model_path

        path = default_model_path()
    else:
        path = Path(args.model)
    config = read_config(path)
    return path, load_tokenizer(path), ModelSpec.from_hf_config(config), resolve_dtype(args.dtype, config)


def _workloads(
    args: argparse.Namespace,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    tokenizer: PreTrainedTokenizerBase,
    spec: ModelSpec,
) -> tuple[Workload, list[Request]]:
    """The timed workload, and random warm-up requests shaped like it."""
    avoid = set(tokenizer.all_special_ids) | set(spec.eos_token_ids)
    workload = build_workload(
        args.workload,
        args.num_requests,
        input_len,
        output_len,
        scale=args.scale,
        seed=args.seed,
        tokenizer=tokenizer,
        vocab_size=spec.vocab_size,
        avoid_ids=avoid,
    )
    if not args.warmup:
        return workload, []
    # Another seed, so the timed prompts never hit blocks that warmup left in the prefix cache.
    warmup = random_workload(
        args.warmup,
        workload.input_len,
        tuple(min(n, WARMUP_OUTPUT_LEN) for n in workload.output_len),
        vocab_size=spec.vocab_size,
        seed=args.seed + 1,
        avoid_ids=avoid,
    )
    return workload, warmup


def _mean_of_rounds(runs: list[dict]) -> dict:
    """One result per configuration: rates averaged over its rounds, each round's figure kept; counters
    and KV figures are the last round's."""
    result = dict(runs[-1])
    for key in ("elapsed_s", "requests_per_s", "total_tokens_per_s", "output_tokens_per_s"):
        result[key] = sum(r[key] for r in runs) / len(runs)
    result["rounds_output_tokens_per_s"] = [r["output_tokens_per_s"] for r in runs]
    return result


def run_baseline(
    model_path: Path, requests: list[Request], dtype: torch.dtype, batch_sizes: tuple[int, ...]
) -> dict:
    from sidp.bench.hf_baseline import best_transformers

    logger.info("probing transformers batch sizes %s, then running the full workload", list(batch_sizes))
    hf = {
        "engine": "transformers",
        "label": "transformers",
        **best_transformers(model_path, requests, dtype, batch_sizes),
    }
    print(f"transformers (batch size {hf['batch_size']}): {throughput_line(hf)}")
    probed = ", ".join(f"{p['batch_size']}: {p['total_tokens_per_s']:.1f}" for p in hf["probe"])
    print(f"  batch size probe on a shrunk workload, total tokens/s ({hf['probe_s']:.1f} s): {probed}")
    return hf


def run_sidp(llm, requests: list[Request], warmup: list[Request], label: str) -> dict:
    """Warm up, then time one `generate` over the whole workload (counters cover only that)."""
    from sidp.sampling_params import SamplingParams

    def generate(reqs: list[Request]) -> list:
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
        params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
        return llm.generate(prompts, params, use_tqdm=False)

    with PeakPss(llm.replica_pids()) as peaks:
        if warmup:
            logger.info("warming up with %d requests", len(warmup))
            generate(warmup)
        before = llm.replica_counters()
        logger.info("timing %d requests", len(requests))
        started = time.perf_counter()
        outputs = generate(requests)
        elapsed = time.perf_counter() - started
    for i, (r, o) in enumerate(zip(requests, outputs, strict=True)):
        got = len(o.outputs[0].token_ids)
        if got != r.output_len:
            raise SidpError(
                f"sidp returned {got} tokens for request {i}, which asked for {r.output_len}; "
                "throughput counted from the request would be wrong."
            )
    after = llm.replica_counters()
    counters = totals(before, after)
    result = {
        "engine": "sidp",
        "label": label,
        **rates(requests, elapsed),
        "max_num_seqs": llm.config.max_num_seqs,
        "max_num_batched_tokens": llm.config.max_num_batched_tokens,
        "prefix_caching": llm.config.enable_prefix_caching,
        "max_model_len": llm.max_model_len,
        "kv_cache_tokens": min(plan.kv_tokens for plan in llm.plans),  # per replica, the tightest
        "kv_cache_tokens_by_replica": [plan.kv_tokens for plan in llm.plans],
        "memory_per_replica_by_replica": [plan.budget for plan in llm.plans],
        "peak_pss_by_replica": peaks.pss,  # sampled; see sidp/bench/resident.py
        "peak_rss_by_replica": peaks.rss,
        "num_steps": counters["steps"],
        "num_preemptions": counters["preemptions"],
        "counters": counters,
        "replica_counters": [{k: v for k, v in c.items() if k != "probes"} for c in after],
    }
    if any(c.get("probes") for c in after):
        result["probes"] = probe_summary(after)
    return result


def parse_range(text: str, option: str) -> tuple[int, int]:
    """ "100:400" → (100, 400); "200" → (200, 200)."""
    parts = text.split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not 1 <= low <= high:
        raise SidpError(f"{option} {text!r} should be LOW:HIGH with 1 <= LOW <= HIGH, or a single number.")
    return low, high


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise SidpError(f"--hf-batch-sizes {text!r} should be positive integers with commas, like 8,16,32.")
    return sizes


def _check_fits(requests: list[Request], max_model_len: int) -> None:
    longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    if longest > max_model_len:
        raise DoesNotFit(
            f"The longest request needs {longest} tokens but max_model_len is {max_model_len}; "
            "shorten the workload (--input-len/--output-len, --scale) or raise --memory-per-replica."
        )


def _prepare_out(path: Path) -> None:
    """Fail now if `path` cannot be written, leaving no empty file behind for a run that fails later."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with path.open("a", encoding="utf-8"):
            pass
        if not existed:
            path.unlink()
    except OSError as error:
        raise SidpError(f"Cannot write --out {path}: {error.strerror}.") from None
