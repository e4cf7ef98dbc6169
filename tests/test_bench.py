"""`sidp bench`: a reproducible workload, honest token counts in the transformers baseline, and a full run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from helpers import budget_for_blocks, hf_greedy, over_runtime

from sidp.bench import hf_baseline, throughput
from sidp.bench.workload import Request, random_workload
from sidp.errors import SidpError

SPECIAL = (0, 1, 2)


def test_workload_is_reproducible_and_in_range():
    a = random_workload(50, (3, 9), (2, 5), vocab_size=40, seed=3, avoid_ids=SPECIAL)
    b = random_workload(50, (3, 9), (2, 5), vocab_size=40, seed=3, avoid_ids=SPECIAL)
    assert a == b
    assert {len(r.prompt_token_ids) for r in a} == set(range(3, 10))  # both ends of the range are reached
    assert {r.output_len for r in a} == set(range(2, 6))
    ids = {t for r in a for t in r.prompt_token_ids}
    assert ids == set(range(3, 40))  # every id but the special ones, none outside the vocabulary


def test_workload_ignores_global_random_state_and_depends_on_seed():
    torch.manual_seed(123)
    a = random_workload(8, vocab_size=1000, seed=0)
    torch.manual_seed(456)
    assert random_workload(8, vocab_size=1000, seed=0) == a
    assert random_workload(8, vocab_size=1000, seed=1) != a


def test_workload_rejects_bad_ranges():
    with pytest.raises(SidpError):
        random_workload(4, (10, 5), vocab_size=100)
    with pytest.raises(SidpError):
        random_workload(4, vocab_size=3, avoid_ids=SPECIAL)


def test_padded_batch_matches_unpadded_greedy(tiny_model):
    path = tiny_model("llama")
    batch = random_workload(3, (4, 20), (5, 5), vocab_size=256, seed=2, avoid_ids=SPECIAL)
    model = hf_baseline.load_model(path, torch.float32)
    got = hf_baseline.generate_batch(model, batch).tolist()
    assert got == hf_greedy(path, [r.prompt_token_ids for r in batch], 5)


def test_run_transformers_counts_requested_tokens(tiny_model):
    requests = [Request([5, 6, 7], 4), Request([8] * 10, 9), Request([9] * 6, 2)]
    result = hf_baseline.run_transformers(tiny_model("llama"), requests, torch.float32, batch_size=2)
    elapsed = result["elapsed_s"]
    assert result["requests_per_s"] == pytest.approx(3 / elapsed)
    assert result["output_tokens_per_s"] == pytest.approx(15 / elapsed)
    assert result["total_tokens_per_s"] == pytest.approx((19 + 15) / elapsed)
    # Batches of 2 then 1: the first pads both rows to 9 new tokens; only 4 + 9 + 2 count as output.
    assert result["generated_tokens"] == 2 * 9 + 2


@pytest.mark.parametrize("text, want", [("100:400", (100, 400)), ("7", (7, 7))])
def test_parse_range(text, want):
    assert throughput.parse_range(text, "--input-len") == want


@pytest.mark.parametrize("text", ["5:2", "0:3", "a:b", "1:2:3"])
def test_parse_range_rejects(text):
    with pytest.raises(SidpError):
        throughput.parse_range(text, "--input-len")


def bench_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_end_to_end_writes_both_engines(tiny_model, tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"
    args = bench_args(
        [
            "--model",
            str(tiny_model("llama")),
            "--dtype",
            "float32",
            "--num-requests",
            "6",
            "--input-len",
            "4:16",
            "--output-len",
            "2:8",
            "--hf-batch-sizes",
            "2,4",
            "--memory-per-replica",
            over_runtime("64MiB"),
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    report = throughput.run(args)
    assert json.loads(out.read_text()) == report
    sidp, hf = report["results"]
    assert (sidp["engine"], hf["engine"]) == ("sidp", "transformers")
    assert [p["batch_size"] for p in hf["probe"]] == [2, 4] and hf["batch_size"] in (2, 4)
    assert report["ratio"] > 0 and report["ratio"] == sidp["vs_transformers"]
    workload = report["workload"]
    assert sidp["output_tokens_per_s"] * sidp["elapsed_s"] == pytest.approx(workload["output_tokens"])
    assert hf["output_tokens_per_s"] * hf["elapsed_s"] == pytest.approx(workload["output_tokens"])
    assert sidp["num_steps"] > 0 and sidp["kv_cache_tokens"] > 0
    assert "vs_peer" not in sidp and "avx512_bf16" in report["machine"]["cpu_flags"]  # no peer without --peer
    assert sidp["memory_per_replica_by_replica"] == [int(over_runtime("64MiB"))]
    assert 0 < sidp["peak_pss_by_replica"][0] <= sidp["peak_rss_by_replica"][0]  # this very process
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Throughput: ") and lines[0].endswith(" output tokens/s")
    assert lines[1].startswith("transformers (batch size ")


def test_bench_runs_dp_and_every_sidp_mode_side_by_side(tiny_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = bench_args(
        ["--model", str(tiny_model("qwen2", layers=4)), "--dtype", "float32", "--num-requests", "6"]
        + [
            "--input-len",
            "4:40",
            "--output-len",
            "8:16",
            "--memory-per-replica",
            over_runtime("64MiB"),
            "--warmup",
            "1",
        ]
        + ["--dp", "2", "--baseline", "none", "--probe-every", "2", "--out", str(out)]
    )
    report = throughput.run(args)
    results = {r["label"]: r for r in report["results"]}
    assert list(results) == ["dp", "was", "cas", "auto", "map"]
    for r in results.values():
        assert r["output_tokens_per_s"] * r["elapsed_s"] == pytest.approx(report["workload"]["output_tokens"])
        assert len(r["kv_cache_tokens_by_replica"]) == 2 and r["kv_cache_tokens"] > 0
        assert r["counters"]["steps"] > 0
        assert r["memory_per_replica_by_replica"] == [int(over_runtime("64MiB"))] * 2
        assert all(
            0 < pss <= rss
            for pss, rss in zip(r["peak_pss_by_replica"], r["peak_rss_by_replica"], strict=True)
        )
    assert results["dp"]["counters"]["steps_was"] == results["dp"]["counters"]["steps_cas"] == 0
    assert results["was"]["counters"]["was_bytes_fetched"] > 0 and results["was"]["counters"]["cas_sent"] == 0
    assert results["cas"]["counters"]["cas_sent"] > 0 and results["cas"]["counters"]["was_bytes_fetched"] == 0
    assert results["cas"]["counters"]["cas_served"] > 0
    probes = results["auto"]["probes"]
    assert probes["samples"] > 0 and 0 <= probes["auto_matched_faster"] <= 1
    assert sum(row["samples"] for row in probes["by_step_size"]) == probes["samples"]
    text = capsys.readouterr().out
    assert "SiDP group of 2, pooling mlp" in text and "auto chose the faster mode in" in text
    assert "peak PSS by replica" in text
    for label in results:
        assert f"{label}: Throughput: " in text


def test_rounds_alternate_the_order_and_average(tiny_model, tmp_path, capsys):
    args = bench_args(
        ["--model", str(tiny_model("llama")), "--dtype", "float32", "--num-requests", "3", "--warmup", "0"]
        + [
            "--input-len",
            "4:8",
            "--output-len",
            "4",
            "--memory-per-replica",
            over_runtime("64MiB"),
            "--dp",
            "2",
        ]
        + ["--configs", "dp,map", "--rounds", "2", "--baseline", "none", "--out", str(tmp_path / "b.json")]
    )
    report = throughput.run(args)
    printed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if ": Throughput" in line]
    assert printed == ["dp", "map", "map", "dp"]
    for r in report["results"]:
        assert len(r["rounds_output_tokens_per_s"]) == 2
        assert r["output_tokens_per_s"] == pytest.approx(sum(r["rounds_output_tokens_per_s"]) / 2)


def test_the_peer_takes_its_turn_in_the_rounds(tiny_model, monkeypatch):
    """vLLM is not installed where the tests run: a stand-in for its run shows when the rounds call it."""
    model = tiny_model("llama")
    args = bench_args(
        ["--model", str(model), "--dtype", "float32", "--memory-per-replica", over_runtime("64MiB")]
        + ["--peer", "vllm", "--rounds", "3", "--warmup", "0", "--baseline", "none"]
    )
    requests = random_workload(3, (4, 8), (4, 4), vocab_size=100, seed=0, avoid_ids=SPECIAL)
    calls = []

    def peer_run() -> dict:
        calls.append("vllm")
        rates = {"elapsed_s": 1.0, "requests_per_s": 3.0, "total_tokens_per_s": 30.0}
        return {"engine": "vllm", "label": "vllm", **rates, "output_tokens_per_s": float(len(calls))}

    real_run_sidp = throughput.run_sidp
    monkeypatch.setattr(throughput, "run_sidp", lambda *a: calls.append("sidp") or real_run_sidp(*a))
    peer, sidp = throughput.run_configs(args, ["sidp"], requests, [], run_peer=peer_run)
    assert calls == ["vllm", "sidp", "sidp", "vllm", "vllm", "sidp"]  # A B, B A, A B
    assert peer["rounds_output_tokens_per_s"] == [1.0, 4.0, 5.0]
    assert peer["output_tokens_per_s"] == pytest.approx(10 / 3)
    assert sidp["engine"] == "sidp" and len(sidp["rounds_output_tokens_per_s"]) == 3


def test_bench_fixed_shape_and_jsonl_workloads_are_named_in_the_report(tiny_model, tmp_path):
    model = str(tiny_model("llama"))
    common = [
        "--model",
        model,
        "--dtype",
        "float32",
        "--memory-per-replica",
        over_runtime("64MiB"),
        "--warmup",
        "1",
    ]
    common += ["--baseline", "none", "--num-requests", "3"]
    code = throughput.run(
        bench_args([*common, "--workload", "code", "--scale", "0.01", "--out", str(tmp_path / "c.json")])
    )
    assert (
        code["workload"] | {"name": "code", "scale": 0.01, "input_len": [20, 20], "output_len": [3, 3]}
        == code["workload"]
    )
    assert code["workload"]["prompt_tokens"] == 3 * 20 and code["workload"]["output_tokens"] == 3 * 3
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "one two", "max_tokens": 2}\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    jsonl = throughput.run(
        bench_args(
            [*common, "--workload", str(prompts), "--output-len", "5", "--out", str(tmp_path / "j.json")]
        )
    )
    assert (jsonl["workload"]["name"], jsonl["workload"]["num_requests"]) == (str(prompts), 2)
    assert jsonl["workload"]["output_tokens"] == 2 + 5
    [sidp] = jsonl["results"]
    assert sidp["output_tokens_per_s"] * sidp["elapsed_s"] == pytest.approx(7)


def test_memory_sweep_records_every_budget_and_config_and_draws_the_plot(tiny_model, tmp_path, capsys):
    model = tiny_model("llama")
    # Exactly what plain DP needs before its first KV block: dp cannot start, while map, holding half the
    # MLP weights, can. Then a roomy budget where both start.
    tight = budget_for_blocks(model, 0, in_driver=False)  # the bench runs every replica in a process
    roomy = over_runtime("64MiB")
    out = tmp_path / "sweep.json"
    args = bench_args(
        ["--model", str(model), "--dtype", "float32", "--num-requests", "3", "--warmup", "0"]
        + [
            "--input-len",
            "4:8",
            "--output-len",
            "4",
            "--dp",
            "2",
            "--configs",
            "dp,map",
            "--baseline",
            "none",
        ]
        + ["--sweep", "memory", "--budgets", f"{roomy},{tight}", "--out", str(out)]
    )
    report = throughput.run(args)
    assert json.loads(out.read_text()) == report
    got = [(r["budget"], r["label"], r["fits"]) for r in report["results"]]
    assert got == [
        (str(tight), "dp", False),
        (str(tight), "map", True),
        (roomy, "dp", True),
        (roomy, "map", True),
    ]
    assert report["sweep"]["budgets"] == [tight, int(roomy)]
    misfit, tight_map, roomy_dp, roomy_map = report["results"]
    assert "cannot hold this model" in misfit["error"]
    assert tight_map["memory_per_replica"] == tight and tight_map["kv_cache_tokens"] > 0
    assert tight_map["kv_cache_tokens"] < roomy_map["kv_cache_tokens"]
    assert roomy_dp["kv_cache_tokens"] < roomy_map["kv_cache_tokens"]
    for r in (tight_map, roomy_dp, roomy_map):
        assert r["output_tokens_per_s"] * r["elapsed_s"] == pytest.approx(report["workload"]["output_tokens"])
    png = tmp_path / "sweep.png"
    assert report["sweep"]["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    text = capsys.readouterr().out
    assert f"{tight} dp: does not fit: memory_per_replica=" in text
    assert f"{tight} map: Throughput: " in text and f"{roomy} dp: Throughput: " in text
    table = text[text.index("memory sweep: 2 replica(s), pooling mlp, workload random") :].splitlines()
    rows = [line.split() for line in table[3:7]]  # under the title, the head and its rule
    assert rows[0] == [str(tight), "dp", "does", "not", "fit"]
    assert [row[:2] for row in rows[1:]] == [[str(tight), "map"], [roomy, "dp"], [roomy, "map"]]
    assert rows[3][3] == f"{roomy_map['kv_cache_tokens'] / roomy_dp['kv_cache_tokens']:.2f}x"  # KV vs DP


def test_memory_sweep_where_nothing_fits_says_so(tiny_model, tmp_path):
    args = bench_args(
        ["--model", str(tiny_model("llama")), "--dtype", "float32", "--dp", "2", "--configs", "dp,map"]
        + [
            "--baseline",
            "none",
            "--sweep",
            "memory",
            "--budgets",
            "100KiB,200KiB",
            "--out",
            str(tmp_path / "s.json"),
        ]
    )
    with pytest.raises(SidpError, match="No configuration could start at any budget.*cannot hold this model"):
        throughput.run(args)
    assert not (tmp_path / "s.json").exists()  # checked writable at the start, not left empty


def test_memory_sweep_stops_on_an_error_that_is_not_the_budgets(tiny_model, tmp_path):
    args = bench_args(
        ["--model", str(tiny_model("llama")), "--dtype", "float32", "--dp", "2", "--configs", "dp,map"]
        + [
            "--baseline",
            "none",
            "--sweep",
            "memory",
            "--budgets",
            over_runtime("64MiB"),
            "--cache-slots",
            "0",
        ]
        + ["--out", str(tmp_path / "s.json")]
    )
    with pytest.raises(SidpError) as error:
        throughput.run(args)
    assert str(error.value).startswith("cache_slots must be at least 1")  # not "does not fit"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--budgets", "1GiB"], "add --sweep memory"),
        (["--sweep", "memory"], "needs --budgets"),
        (
            ["--sweep", "memory", "--budgets", "1GiB", "--memory-per-replica", "1GiB"],
            "drop --memory-per-replica",
        ),
        (["--sweep", "memory", "--budgets", "1GiB,lots"], "Cannot read the memory size 'lots'"),
        (["--workload", "code", "--scale", "0"], "--scale must be more than 0"),
        (["--scale", "0.5"], "--scale applies to summarization, code, conversation"),
    ],
)
def test_bench_rejects_bad_sweep_and_workload_options(tiny_model, tmp_path, argv, words):
    small = [
        "--num-requests",
        "1",
        "--input-len",
        "4",
        "--output-len",
        "2",
        "--warmup",
        "0",
        "--baseline",
        "none",
    ]
    args = bench_args(["--model", str(tiny_model("llama")), "--out", str(tmp_path / "b.json"), *small, *argv])
    with pytest.raises(SidpError, match=words):
        throughput.run(args)


def test_configs_may_name_their_own_pooled_parts():
    from sidp.bench.modes import config_arguments, parse_configs

    assert parse_configs("dp, map ,auto:attn+mlp") == ["dp", "map", "auto:attn+mlp"]
    assert config_arguments("auto:attn+mlp") == {
        "weight_sharing": "sidp",
        "sidp_mode": "auto",
        "pooled_parts": "mlp,attn",
    }
    assert "pooled_parts" not in config_arguments("map")
    for bad in ("dp:mlp", "fast", "map:gpu"):
        with pytest.raises(SidpError):
            parse_configs(bad)


def test_reports_name_the_home_folder_as_tilde():
    home = Path.home()
    assert throughput.home_as_tilde(str(home / ".cache" / "x")) == "~/.cache/x"
    assert throughput.home_as_tilde(str(home) + "less/x") == str(home) + "less/x"
    assert throughput.home_as_tilde("docs/bench/a.json") == "docs/bench/a.json"
