"""`sidp bench --peer vllm`: its options fail fast, what travels to and from the peer survives the trip,
and the table sets every engine beside vLLM and transformers. No vLLM is needed: the vLLM run itself is
the end-to-end check in docs/BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidp.bench import peer, peer_vllm, throughput
from sidp.bench.report import add_ratios, comparison_table, flags_text, machine_line
from sidp.bench.workload import Request, throughput_line
from sidp.errors import SidpError

REQUESTS = [Request([5, 6, 7], 4), Request([8] * 10, 9)]
WARMUP = [Request([9, 10], 3)]


def bench_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    return parser.parse_args(argv)


def not_executable(tmp_path) -> str:
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n")
    return str(path)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--peer", "vllm"], r"--peer vllm needs --peer-python.*install\.sh"),
        (["--peer", "vllm", "--peer-python", "{tmp}/nowhere"], r"nowhere is not an executable file.*install"),
        (["--peer", "vllm", "--peer-python", "{not_executable}"], r"is not an executable file"),
        # sidp's own python, which has no vLLM: the check really runs it.
        (
            ["--peer", "vllm", "--peer-python", sys.executable],
            r"cannot import vllm \(.*vllm.*\).*install\.sh",
        ),
        (["--peer-python", sys.executable], r"add --peer vllm"),
        (["--peer", "vllm", "--sweep", "memory", "--budgets", "1GiB"], r"drop --sweep or --peer"),
    ],
)
def test_peer_options_fail_before_the_model_is_read(tmp_path, argv, words):
    fill = {"tmp": str(tmp_path), "not_executable": not_executable(tmp_path)}
    # No model at this path: an error about the model would mean the check came too late.
    argv = [a.format(**fill) for a in argv] + ["--model", str(tmp_path / "no-model")]
    with pytest.raises(SidpError, match=words):
        throughput.run(bench_args([*argv, "--out", str(tmp_path / "b.json")]))


def test_peer_env_binds_every_core_and_keeps_the_users_vllm_settings():
    env = peer.peer_env({"PATH": "/bin", "HF_HUB_OFFLINE": "0"}, cores=16)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-15" and env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["PATH"] == "/bin"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == env["VLLM_NO_USAGE_STATS"] == "1"
    mine = peer.peer_env({"VLLM_CPU_KVCACHE_SPACE": "20", "VLLM_CPU_OMP_THREADS_BIND": "0-3"}, cores=16)
    assert (mine["VLLM_CPU_KVCACHE_SPACE"], mine["VLLM_CPU_OMP_THREADS_BIND"]) == ("20", "0-3")


def test_command_and_workload_reach_the_runner_as_sent(tmp_path):
    workload, out = tmp_path / "w.json", tmp_path / "r.json"
    command = peer.peer_command("/venv/bin/python", "vllm", tmp_path / "model", workload, "float32", out)
    assert command[:2] == ["/venv/bin/python", peer_vllm.__file__]
    args = peer_vllm.parse_args(command[2:])
    assert (args.model, args.workload, args.dtype, args.out) == (
        str(tmp_path / "model"),
        workload,
        "float32",
        out,
    )

    assert not args.profile
    profiled = peer.peer_command(
        "/venv/bin/python", "vllm", tmp_path / "model", workload, "float32", out, profile=True
    )
    assert profiled == [*command, "--profile"] and peer_vllm.parse_args(profiled[2:]).profile

    long = Request([3] * 2000, 100)
    peer.write_workload(workload, [*REQUESTS, long], WARMUP)
    timed, warmup = peer_vllm.read_workload(workload)
    assert timed == [([5, 6, 7], 4), ([8] * 10, 9), ([3] * 2000, 100)]
    assert warmup == [([9, 10], 3)]
    assert peer_vllm.model_len(timed + warmup) == 2100
    assert peer_vllm.model_len(warmup) == 2048


def runner_result(**changes) -> dict:
    """What peer_vllm.py writes after timing REQUESTS in 2 s."""
    result = {
        "engine": "vllm",
        "version": "0.32.0",
        "dtype": "bfloat16",
        "elapsed_s": 2.0,
        "num_requests": 2,
        "prompt_tokens": 13,
        "output_tokens": 13,
        "max_num_seqs": 256,
        "max_model_len": 2048,
        "prefix_caching": False,
        "env": {"VLLM_CPU_KVCACHE_SPACE": "4"},
    }
    return result | changes


def test_the_runners_result_reads_back_with_sidps_rates(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(runner_result()))
    result = peer.read_result(path, REQUESTS)
    assert (result["engine"], result["label"], result["version"]) == ("vllm", "vllm", "0.32.0")
    assert result["env"] == {"VLLM_CPU_KVCACHE_SPACE": "4"} and result["max_num_seqs"] == 256
    assert (result["requests_per_s"], result["total_tokens_per_s"], result["output_tokens_per_s"]) == (
        1,
        13,
        6.5,
    )
    # Both sides print vLLM's line, and for the same run it must read the same.
    assert throughput_line(result) == peer_vllm.throughput_line(runner_result())
    assert "ops" not in result
    ops = {"_C::onednn_mm": {"self_s": 1.5, "calls": 90}}
    path.write_text(json.dumps(runner_result(ops=ops)))
    assert peer.read_result(path, REQUESTS)["ops"] == ops  # a profiled run's op times come through


def test_a_profiled_runner_restarts_only_when_its_engine_would_not_be_in_process(monkeypatch):
    """The restart itself (exec with libgomp preloaded) runs in the vLLM venv, under
    benchmarks/profile_bench.py --peer-python; here: that an already prepared runner goes on."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("LD_PRELOAD", "/venv/lib/python3.11/site-packages/torch/lib/libgomp.so.1")
    monkeypatch.setattr(peer_vllm.os, "execve", lambda *a: pytest.fail("restarted an in-process runner"))
    peer_vllm.restart_in_process()


def test_a_result_for_another_workload_or_none_is_an_error(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(runner_result(output_tokens=12)))
    with pytest.raises(SidpError, match="another workload"):
        peer.read_result(path, REQUESTS)
    with pytest.raises(SidpError, match="no readable result"):
        peer.read_result(tmp_path / "missing.json", REQUESTS)


def test_stream_copies_the_output_and_reports_failures_with_their_last_lines(capsys):
    peer.stream([sys.executable, "-c", "print('compiling'); print('ready')"], {}, limit_s=60)
    assert capsys.readouterr().err == "compiling\nready\n"
    failing = "import sys; print('loading'); sys.exit('RuntimeError: no AMX here')"
    with pytest.raises(
        SidpError, match=r"exit status 1; its last lines:\nloading\nRuntimeError: no AMX here"
    ):
        peer.stream([sys.executable, "-c", failing], peer.peer_env({}), limit_s=60)


def test_stream_stops_a_peer_that_runs_past_its_limit():
    # interruptible as the runner is, or it would sit out the grace period where a shell ignores SIGINT
    hangs = (
        "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "print('compiling', flush=True); time.sleep(60)"
    )
    with pytest.raises(SidpError, match=r"ran past its 0.5 s and was stopped; its last lines:\ncompiling"):
        peer.stream([sys.executable, "-c", hangs], {}, limit_s=0.5)


def test_a_stopped_peer_gets_to_clean_up_and_one_that_will_not_is_killed(tmp_path):
    """SIGINT first (vLLM unlinks its shared memory on it), SIGKILL after the grace period."""
    held = tmp_path / "held"
    cleans_up = (
        # restores the Ctrl-C that a background job's shell ignores, as the runner does (stop_with_parent)
        "import pathlib, signal, time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"p = pathlib.Path({str(held)!r}); p.touch(); print('serving', flush=True)\n"
        "try:\n    time.sleep(60)\nfinally:\n    p.unlink()"
    )
    with pytest.raises(SidpError, match="ran past its 0.5 s"):
        peer.stream([sys.executable, "-c", cleans_up], {}, limit_s=0.5, grace_s=30)
    assert not held.exists()

    pid_file, segment = tmp_path / "pid", Path(f"/dev/shm/sidp-test-peer-{os.getpid()}")
    stubborn = (  # ignores SIGINT, and holds shared memory mapped as vLLM does
        "import mmap, os, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        f"fd = os.open({str(segment)!r}, os.O_CREAT | os.O_RDWR); os.ftruncate(fd, 4096)\n"
        "held = mmap.mmap(fd, 4096)\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('serving', flush=True); time.sleep(60)"
    )
    started = time.monotonic()
    with pytest.raises(SidpError, match="ran past its 0.5 s"):
        peer.stream([sys.executable, "-c", stubborn], {}, limit_s=0.5, grace_s=1)
    assert time.monotonic() - started < 30
    assert not Path(f"/proc/{pid_file.read_text()}").exists()
    assert not segment.exists()  # killed, it could not unlink it: sidp did


def test_a_runner_whose_sidp_was_killed_interrupts_itself(tmp_path):
    """peer_vllm.stop_with_parent: its parent gone, the runner's group gets the Ctrl-C that lets vLLM clean
    up (in a session of its own, as sidp starts it)."""
    done = tmp_path / "done"
    runner = (
        f"import os, sys, time; sys.path.insert(0, {str(Path(peer_vllm.__file__).parent)!r})\n"
        "import peer_vllm; peer_vllm.stop_with_parent(os.getppid(), every_s=0.05, grace_s=30)\n"
        "print('serving', flush=True)\n"
        f"try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    open({str(done)!r}, 'w').close()"
    )
    parent = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {runner!r}], start_new_session=True); time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True) as sidp_stand_in:
        assert sidp_stand_in.stdout.readline() == "serving\n"
        sidp_stand_in.kill()
    deadline = time.monotonic() + 10
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done.exists()


def engine(engine: str, label: str, output: float, **more) -> dict:
    rates = {"requests_per_s": output / 100, "total_tokens_per_s": 2 * output, "output_tokens_per_s": output}
    return {"engine": engine, "label": label, **rates, **more}


def test_table_sets_every_engine_beside_vllm_and_transformers():
    results = [
        engine("vllm", "vllm", 500.0, max_num_seqs=256),
        engine("sidp", "dp", 250.0, max_num_seqs=128),
        engine("sidp", "map", 1000.0, max_num_seqs=128),
        engine("transformers", "transformers", 50.0, batch_size=32),
    ]
    add_ratios(results, "vllm")
    assert [r["vs_peer"] for r in results] == [1.0, 0.5, 2.0, 0.1]
    assert [r["vs_transformers"] for r in results] == [10.0, 5.0, 20.0, 1.0]
    head, rule, *rows = comparison_table(results, "vllm").splitlines()
    assert head.split()[-4:] == ["vs", "vllm", "vs", "HF"] and set(rule) == {"-"}
    assert [row.split() for row in rows] == [
        ["vllm", "<=256", "5.00", "1000.00", "500.00", "1.00x", "10.00x"],
        ["dp", "<=128", "2.50", "500.00", "250.00", "0.50x", "5.00x"],
        ["map", "<=128", "10.00", "2000.00", "1000.00", "2.00x", "20.00x"],
        ["transformers", "32", "0.50", "100.00", "50.00", "0.10x", "1.00x"],
    ]


def test_without_a_peer_or_a_baseline_the_ratios_are_absent_or_dashes():
    results = [engine("sidp", "sidp", 250.0, max_num_seqs=128), engine("sidp", "tight", 9.0, fits=False)]
    add_ratios(results, None)
    assert all("vs_peer" not in r and r["vs_transformers"] is None for r in results)
    head, _, row, _ = comparison_table(results[:1] * 2).splitlines()
    assert "vs vllm" not in head and row.split()[-1] == "-"


def test_machine_line_names_the_bf16_instructions_present_and_missing():
    flags = {"avx2": True, "avx512f": True, "avx512_bf16": False, "amx_tile": False, "amx_bf16": False}
    assert flags_text(flags) == "avx2 avx512f, no avx512_bf16 amx_tile amx_bf16"
    assert flags_text(dict.fromkeys(flags, True)) == "avx2 avx512f avx512_bf16 amx_tile amx_bf16"
    assert flags_text(dict.fromkeys(flags, False)) == "no avx2 avx512f avx512_bf16 amx_tile amx_bf16"
    machine = {"cpu": "Xeon", "cpu_flags": flags, "cores": 2, "torch_threads": 2, "torch": "2.13"}
    line = machine_line(machine | {"loadavg_before": [0.5, 0, 0], "loadavg": [1.5, 0, 0]})
    assert line.startswith("machine: Xeon (avx2 avx512f, no avx512_bf16 amx_tile amx_bf16), 2 cores")


def test_bf16_flags_reads_the_cpu_flags(monkeypatch):
    from sidp import machine

    monkeypatch.setattr(
        machine, "cpuinfo", lambda *keys: "fpu avx2 amx_tile amx_int8" if "flags" in keys else None
    )
    machine.cpu_flags.cache_clear()  # read once per process: this test's flags must be read afresh
    try:
        assert machine.bf16_flags() == {
            "avx2": True,
            "avx512f": False,
            "avx512_bf16": False,
            "amx_tile": True,
            "amx_bf16": False,
        }
    finally:
        machine.cpu_flags.cache_clear()  # the next reader sees this CPU's flags again
