"""`sidp plan`: the GPU ledger checked by hand, the step-time model's shape, and that predictions come
from the engine's own scheduler."""

from __future__ import annotations

import argparse
import json

import pytest
from helpers import over_runtime

from sidp.bench.workload import Request
from sidp.cli import main
from sidp.engine.llm_engine import LLMEngine
from sidp.engine.scheduler import Scheduler
from sidp.errors import SidpError
from sidp.plan.capacity import Layout, capacity
from sidp.plan.hardware import gpu
from sidp.plan.models import model_spec, tensor_shard
from sidp.plan.simulate import replica_step_times, simulate
from sidp.plan.step_time import StepTime

MLP = frozenset({"mlp"})


def test_qwen3_32b_on_h200_by_hand():
    _, spec = model_spec("qwen3-32b")
    # hidden 5120, 64 layers, 64 heads / 8 KV heads of 128, MLP 25600, vocab 151936, untied; bf16.
    embed = 151936 * 5120 * 2
    attn_layer = ((64 + 2 * 8) * 128 * 5120 + 64 * 128 * 5120) * 2
    mlp_layer = 3 * 5120 * 25600 * 2
    norms = ((2 * 5120 + 2 * 128) * 64 + 5120) * 2
    weights = 2 * embed + 64 * (attn_layer + mlp_layer) + norms
    assert weights == 65_524_246_528  # 61.0 GiB
    budget = int(141 * 2**30 * 0.9)
    # 8192 batched tokens of one layer's activations (bf16, float32 residual pair), float32 logits x2
    per_token = (5 * 5120 + 3 * 8192 + 3 * 1024 + 4 * 25600) * 2 + 2 * 5120 * 4
    workspace = 8192 * per_token + 1024 * 151936 * 4 * 2
    # the rotary table of 40,960 positions; a prefill chunk of 8192 over 40,960 cached tokens: K/V, mask
    fixed = 2 * 40960 * 128 * 2 + 40960 * 2 * 1024 * 2 + 8192 * 40960
    block = 2 * 64 * 8 * 128 * 2 * 16  # K and V, all layers, 16 tokens
    dp = capacity(spec, gpu("H200"), Layout(8))
    assert [p.overhead_total for p in dp.plans] == [fixed] * 8  # no host runtime in a GPU's budget
    assert [p.kv_tokens for p in dp.plans] == [(budget - weights - fixed - workspace) // block * 16] * 8
    assert dp.kv_tokens_per_replica == 252_064 and dp.kv_tokens_per_node == 8 * 252_064

    sidp = capacity(spec, gpu("H200"), Layout(8, parts=MLP))
    rank0 = sidp.plans[0]  # owns layers 0, 8, ..., 56: 8 MLPs, and two slots of one MLP each
    cas = 7 * 256 * 10240 * 2 + 7 * 256 * (2 * 10240 + 3 * 25600) * 2  # buffers + service rows
    held = weights - 56 * mlp_layer + 2 * mlp_layer + cas
    assert rank0.weight_total == held
    assert rank0.kv_tokens == (budget - held - fixed - workspace) // block * 16 == 412_592
    assert sidp.kv_tokens_per_replica / dp.kv_tokens_per_replica == pytest.approx(1.637, abs=1e-3)


def test_70b_fits_only_when_pooled_at_tp1_and_tensor_shards_halve_it():
    _, spec = model_spec("llama-3.1-70b")
    assert not capacity(spec, gpu("H200"), Layout(8)).fits
    assert capacity(spec, gpu("H200"), Layout(8, parts=MLP)).fits
    shard = tensor_shard(spec, 2)
    assert (shard.num_heads, shard.num_kv_heads, shard.intermediate_size) == (32, 4, 14336)
    with pytest.raises(SidpError, match="does not divide"):
        tensor_shard(spec, 3)


def test_step_time_cas_wins_decode_was_wins_big_prefill():
    _, spec = model_spec("qwen3-32b")
    step = StepTime(spec, gpu("H200"), parts=MLP, remote_layers=56)
    assert step.policy.choose(8) == "cas"
    assert step.policy.choose(8192) == "was"  # the copy hides under a big chunk's compute
    decode = step.seconds(tokens=64, seqs=64, attended=64 * 4096, kv_read=64 * 4096)
    longer = step.seconds(tokens=64, seqs=64, attended=64 * 8192, kv_read=64 * 8192)
    assert longer > decode  # reading more KV costs time
    assert step.modes == {"cas": 2}


def test_custom_gpu_needs_every_figure():
    assert gpu(memory_gib=80, hbm_tb_s=3.35, bf16_tflops=989, nvlink_gb_s=900).name == "custom"
    with pytest.raises(SidpError, match="--hbm-tb-s"):
        gpu(memory_gib=80, bf16_tflops=989, nvlink_gb_s=900)
    with pytest.raises(SidpError, match="Unknown GPU"):
        gpu("Z9000")


def test_prediction_runs_the_engines_scheduler(monkeypatch):
    """Every step of the prediction is the engine's Scheduler.schedule inside LLMEngine.step, and a KV
    cache too small for the workload makes that scheduler preempt, as the real one would."""
    _, spec = model_spec("qwen3-32b")
    calls = {"schedule": 0, "step": 0}
    schedule, step = Scheduler.schedule, LLMEngine.step

    def counted_schedule(self):
        calls["schedule"] += 1
        return schedule(self)

    def counted_step(self):
        calls["step"] += 1
        return step(self)

    monkeypatch.setattr(Scheduler, "schedule", counted_schedule)
    monkeypatch.setattr(LLMEngine, "step", counted_step)
    small = gpu("H200", memory_gib=80)  # 72 GiB usable: about 30k KV tokens beside 61 GiB of weights
    requests = [Request([0] * 2048, 1024) for _ in range(32)]
    dp = capacity(spec, small, Layout(2))
    result = simulate(spec, dp, replica_step_times(spec, small, dp), requests, 1024, 8192)
    assert result.steps == calls["step"] == calls["schedule"] > 0
    assert result.preemptions > 0
    sidp = capacity(spec, small, Layout(2, parts=MLP))
    pooled = simulate(spec, sidp, replica_step_times(spec, small, sidp), requests, 1024, 8192)
    assert sidp.kv_tokens_per_replica > 2 * dp.kv_tokens_per_replica
    assert pooled.preemptions < result.preemptions and pooled.elapsed_s < result.elapsed_s
    assert sum(pooled.modes.values()) == pooled.steps


def test_plan_command_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["plan", "--model", "llama-3.1-70b", "--dp", "4,8", "--tp", "1,2", "--workload", "none"]
    assert main([*args, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "does not fit" in text and "WaS as fast as CaS from" in text
    plan = json.loads(out.read_text())
    rows = {(r["dp"], r["tp"], r["config"]): r for r in plan["rows"]}
    assert (8, 2, "dp") not in rows  # 16 GPUs: more than a node
    assert not rows[(8, 1, "dp")]["fits"] and rows[(8, 1, "sidp mlp")]["fits"]
    assert rows[(4, 2, "sidp mlp")]["kv_tokens_per_replica"] > rows[(4, 2, "dp")]["kv_tokens_per_replica"]


def test_plan_command_errors_in_one_line(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path / "nowhere")]) == 2
    assert main(["plan", "--gpu", "custom", "--memory-gib", "80"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("sidp: error: ") for line in err)


def test_bench_predict_replays_a_replicas_own_steps(tiny_model, tmp_path, capsys):
    """One replica pulls the requests in order, so the planner's run of the engine's scheduler over the
    same requests and memory plan takes exactly the steps the real replica took; a group predicts each
    configuration beside its measurement."""
    from sidp.bench import throughput

    def bench(*extra: str) -> dict:
        parser = argparse.ArgumentParser()
        throughput.add_arguments(parser)
        argv = ["--model", str(tiny_model("llama")), "--dtype", "float32", "--num-requests", "8"]
        argv += [
            "--input-len",
            "20:60",
            "--output-len",
            "8:24",
            "--memory-per-replica",
            over_runtime("40MiB"),
        ]
        argv += ["--warmup", "0"]
        argv += ["--baseline", "none", "--predict", "--out", str(tmp_path / "b.json"), *extra]
        return throughput.run(parser.parse_args(argv))

    first = bench("--max-num-seqs", "3")
    (one,) = first["calibration"]["rows"]
    assert one["predicted_steps"] == one["measured_steps"] > 8
    assert one["predicted_step_ms"] > 0 and one["measured_step_ms"] > 0
    assert 0 <= one["fitted_share"] < 1 and one["measured_mode_shares"] == one["predicted_mode_shares"] == {}
    (tmp_path / "b.json").rename(tmp_path / "fitted.json")
    group = bench("--dp", "2", "--configs", "dp,cas", "--predict-device", str(tmp_path / "fitted.json"))
    assert group["calibration"]["device"] == first["calibration"]["device"]  # not measured again
    assert group["calibration"]["device_source"] == "given"
    dp, cas = group["calibration"]["rows"]
    assert (dp["label"], cas["label"]) == ("dp", "cas")
    assert cas["measured_mode_shares"] == cas["predicted_mode_shares"] == {"was": 0, "cas": 1, "map": 0}
    assert cas["mode_mix_matches"] and cas["hit"] == (abs(cas["step_error"]) <= 0.2)
    assert "hits (step time within 20% and the same mode mix):" in capsys.readouterr().out
