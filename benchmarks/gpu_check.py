"""The GPU check: what sidp does on one CUDA GPU, each part in its own process with its own time limit,
results written to JSON as each part ends (a part that fails or times out does not hide the others).

    python benchmarks/gpu_check.py --out docs/gpu/gpu-check.json      # about 6 minutes on one H200

Parts: the machine; CUDA IPC between two processes and the copy bandwidth from a peer's tensor; the
Triton decode kernel against the gather reference; greedy token ids on CUDA (float32) against
`transformers` on CUDA for tiny random Llama, Qwen2 and Qwen3; plain DP groups of 2 and 3 replicas
sharing the one GPU against N=1; what SiDP on CUDA says today; capacity and measured memory against
the budget; and speed on a random model with Qwen3-32B's layer shapes (fewer layers): output tokens/s
against `transformers`, decode step time against the HBM roofline, and the per-layer ingredients of
WaS and CaS (one MLP's copy, its matmul by rows) beside what `sidp plan` predicts for an H200.
Runs under the GPU machine's own python (no network): PYTHONPATH=. python benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PARTS = {  # name -> time limit, seconds
    "machine": 60,
    "ipc": 90,
    "triton_kernel": 120,
    "exact_n1": 150,
    "exact_dp": 150,
    "sidp_on_cuda": 60,
    "capacity_memory": 120,
    "speed": 300,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/gpu/gpu-check.json")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of: " + ", ".join(PARTS))
    parser.add_argument("--part", help=argparse.SUPPRESS)  # run one part in this process
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(globals()[f"part_{args.part}"](args.scratch)))
        return
    report = {"command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]), "parts": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.parts.split(","):
            report["parts"][name] = run_part(name, PARTS[name], Path(scratch))
            args.out.write_text(json.dumps(report, indent=1) + "\n")
            print(f"{name}: {summary(report['parts'][name])}", flush=True)
    print(f"wrote {args.out}")


def run_part(name: str, limit_s: int, scratch: Path) -> dict:
    started = time.monotonic()
    argv = [sys.executable, __file__, "--part", name, "--scratch", str(scratch)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit_s, cwd=ROOT)
    except subprocess.TimeoutExpired as error:
        tail = (error.stderr or b"")[-2000:]
        return {"ok": False, "error": f"timed out after {limit_s} s", "stderr_tail": str(tail)}
    seconds = round(time.monotonic() - started, 1)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {
            "ok": False,
            "seconds": seconds,
            "error": f"exit {done.returncode}",
            "stderr_tail": done.stderr[-3000:],
        }
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"ok": False, "seconds": seconds, "error": "no JSON line", "stdout_tail": done.stdout[-2000:]}
    return {"seconds": seconds, **result}


def summary(result: dict) -> str:
    text = json.dumps({k: v for k, v in result.items() if k not in ("stderr_tail", "stdout_tail")})
    return text if len(text) < 400 else text[:400] + " ..."


def guarded(part):
    """A part returns {"ok": bool, ...}; an exception becomes ok False with its traceback's end."""

    def run(scratch: Path) -> dict:
        try:
            return part(scratch)
        except Exception as error:
            return {"ok": False, "error": repr(error), "trace": traceback.format_exc()[-2000:]}

    return run


# --- parts ----------------------------------------------------------------------------------------------


@guarded
def part_machine(scratch: Path) -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "ok": torch.cuda.is_available(),
        "gpu": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
    }


def _ipc_reader(conn) -> None:
    import torch

    peer = conn.recv()  # a CUDA tensor of the other process, opened by torch's IPC reduction
    checksum = float(peer[:1024].double().sum())
    slot = torch.empty_like(peer)
    slot.copy_(peer)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        slot.copy_(peer)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    conn.send((checksum, peer.nbytes / seconds))


@guarded
def part_ipc(scratch: Path) -> dict:
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    tensor = torch.arange(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    reader = ctx.Process(target=_ipc_reader, args=(theirs,))
    reader.start()
    mine.send(tensor)
    checksum, bandwidth = mine.recv()
    reader.join(30)
    expected = float(tensor[:1024].double().sum())
    return {
        "ok": checksum == expected,
        "read_by_peer": checksum == expected,
        "copy_from_peer_gb_s": round(bandwidth / 1e9, 1),
    }


@guarded
def part_triton_kernel(scratch: Path) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_paged_attention_triton.py",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    return {"ok": done.returncode == 0, "pytest": last}


PROMPTS = [[5, 9, 11, 200, 3], list(range(3, 40)), [17] * 70, list(range(100, 233))]


def _tiny(scratch: Path, family: str) -> Path:
    from conftest import build_tiny_model

    path = scratch / f"tiny-{family}"
    if not path.exists():
        build_tiny_model(path, family, tied=False)
    return path


def _hf_greedy_cuda(path: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    model.generation_config.eos_token_id = None
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        outs.append(out[0, len(prompt) :].tolist())
    return outs


def _sidp_greedy(path: Path, prompts, new_tokens: int, **kwargs) -> list[list[int]]:
    from sidp import LLM, SamplingParams

    kwargs = {"dtype": "float32", "device": "cuda", "memory_per_replica": "2GiB", **kwargs}
    with LLM(path, **kwargs) as llm:
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@guarded
def part_exact_n1(scratch: Path) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as float32, on both sides
    result = {}
    for family in ("llama", "qwen2", "qwen3"):
        path = _tiny(scratch, family)
        result[family] = _sidp_greedy(path, PROMPTS, 24) == _hf_greedy_cuda(path, PROMPTS, 24)
    return {"ok": all(result.values()), "equal_to_transformers": result}


@guarded
def part_exact_dp(scratch: Path) -> dict:
    path = _tiny(scratch, "qwen3")
    prompts = PROMPTS * 4
    one = _sidp_greedy(path, prompts, 24)
    result = {
        f"dp{n}": _sidp_greedy(path, prompts, 24, data_parallel_size=n, memory_per_replica="1GiB") == one
        for n in (2, 3)
    }
    return {"ok": all(result.values()), "plain_dp_equal_to_n1": result}


@guarded
def part_sidp_on_cuda(scratch: Path) -> dict:
    from sidp import LLM, SidpError

    try:
        LLM(
            _tiny(scratch, "llama"),
            device="cuda",
            data_parallel_size=2,
            weight_sharing="sidp",
            memory_per_replica="1GiB",
        )
    except SidpError as error:
        return {"ok": True, "built": False, "says": str(error)}
    return {"ok": True, "built": True}


@guarded
def part_capacity_memory(scratch: Path) -> dict:
    import torch

    from sidp import LLM, SamplingParams
    from sidp.engine_args import replica_ledgers
    from sidp.memory import parse_bytes
    from sidp.model.checkpoint import read_config
    from sidp.model.spec import ModelSpec
    from sidp.pool.placement import Placement

    path = _tiny(scratch, "qwen3")
    spec = ModelSpec.from_hf_config(read_config(path))
    budget = parse_bytes("64MiB")
    limits = (16, 2048, 256)
    kv = {}
    for n in (2, 4):
        layout = Placement.build(spec.num_layers, n)
        sidp, plain = replica_ledgers(
            spec, torch.float32, budget, limits, n, layout, frozenset({"mlp"}), "was", 2, "cuda"
        )
        kv[f"n{n}"] = {"plain_dp": plain.kv_tokens, "sidp_was_tightest": min(p.kv_tokens for p in sidp)}
    with LLM(path, dtype="float32", device="cuda", memory_per_replica=budget, data_parallel_size=2) as llm:
        llm.generate([[5] * 200] * 64, SamplingParams(max_tokens=64, ignore_eos=True), use_tqdm=False)
        held = [c["cuda_max_allocated_mib"] for c in llm.replica_counters()]
    within = all(mib * 2**20 <= budget for mib in held)
    return {"ok": within, "kv_tokens_ledger": kv, "budget_mib": budget / 2**20, "max_allocated_mib": held}


QWEN3_32B_LAYER = dict(
    hidden_size=5120,
    intermediate_size=25600,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
)


@guarded
def part_speed(scratch: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from sidp import LLM, SamplingParams

    path = scratch / "qwen3-32b-shaped"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            Qwen3Config(**QWEN3_32B_LAYER, num_hidden_layers=4, tie_word_embeddings=False),
            dtype=torch.bfloat16,
        )
    model.save_pretrained(path)
    result = {"layers": 4, "shapes": "Qwen3-32B"}
    # transformers: one padded batch of 64 prompts, greedy.
    prompts = [list(range(10, 10 + 512))] * 64
    ids = torch.tensor(prompts, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    result["transformers_output_tok_s"] = round(64 * 128 / (time.perf_counter() - started), 1)
    weight_bytes = sum(p.nbytes for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    with LLM(path, dtype="bfloat16", device="cuda", memory_per_replica="40GiB", max_num_seqs=64) as llm:
        params = SamplingParams(max_tokens=128, ignore_eos=True)
        llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        result["sidp_output_tok_s"] = round(64 * 128 / (time.perf_counter() - started), 1)
        result["decode_step_ms_at_64"] = _decode_step_ms(llm)
    result["ratio_to_transformers"] = round(
        result["sidp_output_tok_s"] / result["transformers_output_tok_s"], 2
    )
    bandwidth = _hbm_copy_gb_s()
    kv_bytes = 64 * (512 + 40) * 4 * 2 * 8 * 128 * 2  # 64 sequences at ~552 tokens, 4 layers, K and V, bf16
    roofline_ms = (weight_bytes + kv_bytes) / (bandwidth * 1e9) * 1e3
    result.update(hbm_copy_gb_s=bandwidth, decode_roofline_ms=round(roofline_ms, 3))
    result["decode_share_of_roofline"] = round(roofline_ms / result["decode_step_ms_at_64"], 2)
    result["mlp_layer"] = _mlp_ingredients()
    result["ok"] = result["ratio_to_transformers"] >= 2 and result["decode_share_of_roofline"] >= 0.5
    return result


def _decode_step_ms(llm) -> float:
    """The median time of a pure decode step of 64 sequences, from the engine's own loop."""
    import torch

    from sidp import SamplingParams

    engine = llm.engine
    for i in range(64):
        engine.add_request(
            10_000 + i, list(range(10, 10 + 512)), SamplingParams(max_tokens=40, ignore_eos=True)
        )
    times = []
    while engine.has_work():
        torch.cuda.synchronize()
        started = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    decode = sorted(times[-30:])  # the prefills come first
    return round(decode[len(decode) // 2] * 1e3, 3)


def _hbm_copy_gb_s() -> float:
    import torch

    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return round(2 * a.nbytes * 20 / (time.perf_counter() - started) / 1e9, 1)  # read + write


def _mlp_ingredients() -> dict:
    """WaS pays one layer's MLP copy; CaS pays its matmul on the owner plus a round trip: both measured
    here on the GPU beside the planner's prediction for an H200."""
    import torch

    from sidp.model.decoder import project
    from sidp.plan.hardware import gpu

    h, f = QWEN3_32B_LAYER["hidden_size"], QWEN3_32B_LAYER["intermediate_size"]
    weights = {
        "gate_up": torch.randn(2 * f, h, device="cuda", dtype=torch.bfloat16) * 0.01,
        "down": torch.randn(h, f, device="cuda", dtype=torch.bfloat16) * 0.01,
    }
    slot = {k: torch.empty_like(v) for k, v in weights.items()}
    copy_ms = _timed_ms(lambda: [slot[k].copy_(v, non_blocking=True) for k, v in weights.items()])
    by_rows = {}
    for rows in (1, 8, 64, 256, 1024, 2048):
        x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
        by_rows[rows] = round(_timed_ms(lambda x=x: project("mlp", x, weights)), 4)
    device = gpu("H200")
    mlp_bytes = 3 * h * f * 2
    predicted_copy_ms = mlp_bytes / device.link_bw * 1e3
    predicted = {rows: round(device.roofline_s(2 * rows * 3 * h * f, mlp_bytes) * 1e3, 4) for rows in by_rows}
    return {
        "copy_ms": round(copy_ms, 4),
        "copy_ms_predicted_h200_nvlink": round(predicted_copy_ms, 4),
        "matmul_ms_by_rows": by_rows,
        "matmul_ms_predicted_h200": predicted,
    }


def _timed_ms(fn, repeats: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


if __name__ == "__main__":
    main()
