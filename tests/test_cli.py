"""The `sidp` command: generate from prompts and JSONL files, info, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import cli_engine_args as engine_args
from transformers import AutoModelForCausalLM

from sidp.batch.formats import content_id
from sidp.cli import main


@pytest.fixture(scope="module")
def model(tiny_model):
    return str(tiny_model("llama"))


def test_generate_prompts(model, capsys):
    assert (
        main(["generate", *engine_args(model), "--prompt", "hi", "--prompt", "yo", "--max-tokens", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert out.index("### hi") < out.index("### yo")


def test_two_replicas_print_what_one_prints(model, capsys):
    base = ["generate", *engine_args(model), "--raw", "--temperature", "0", "--max-tokens", "5"]
    base += ["--prompt", "hello", "--prompt", "world"]
    assert main(base) == 0
    one = capsys.readouterr().out
    assert main([*base, "--dp", "2"]) == 0
    assert capsys.readouterr().out == one


def test_generate_jsonl_in_order_with_per_line_params(model, tmp_path):
    lines = [
        {"id": "a", "prompt": "hello", "max_tokens": 3},
        {"id": "b", "messages": [{"role": "user", "content": "hey"}], "max_tokens": 5, "ignore_eos": True},
        {"prompt": "third", "temperature": 0.7, "seed": 3},
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert (
        main(
            [
                "generate",
                *engine_args(model),
                "--input",
                str(source),
                "--output",
                str(target),
                "--max-tokens",
                "6",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", content_id(lines[2])]
    assert rows[0]["completion_tokens"] <= 3
    assert rows[1]["completion_tokens"] == 5
    assert rows[2]["completion_tokens"] <= 6


def test_a_file_without_requests_fails_in_one_line(model, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("\n\n")
    assert main(["generate", *engine_args(model), "--input", str(source)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no requests" in err and len(err.splitlines()) == 1


def test_user_errors_print_one_line_without_traceback(tmp_path):
    cases = [
        ["generate", "--model", str(tmp_path / "missing")],
        ["generate", "--input", str(tmp_path / "missing.jsonl")],
        ["info", str(tmp_path)],
    ]
    for argv in cases:
        run = subprocess.run(
            [sys.executable, "-m", "sidp.cli", *argv], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("sidp: error:"), run.stderr
        assert "Traceback" not in run.stderr


def test_unwritable_output(model, capsys, tmp_path):
    args = ["generate", *engine_args(model), "--prompt", "x", "--output", str(tmp_path / "no" / "such" / "f")]
    assert main(args) == 2
    assert "Cannot write --output" in capsys.readouterr().err


def test_info_counts_parameters(model, capsys):
    assert main(["info", model, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(model)
    assert f"parameters       {hf.num_parameters():,}" in out


def test_info_shows_who_owns_what(model, capsys):
    assert main(["info", model, "--dtype", "float32", "--dp", "2", "--placement", "contiguous"]) == 0
    out = capsys.readouterr().out
    assert "replica 0: owns layers 0-1" in out and "replica 1: owns layers 2 " in out


def test_generate_runs_one_replica_per_device_with_sidp_by_default():
    from sidp.cli import build_parser
    from sidp.engine_args import group_size

    def group(*argv: str) -> tuple[int, str]:
        return group_size(build_parser().parse_args(["generate", *argv]))

    cores = len(os.sched_getaffinity(0))
    assert group() == ((2, "sidp") if cores >= 2 else (1, "none"))
    assert group("--dp", "3") == (3, "sidp")
    assert group("--dp", "2", "--weight-sharing", "none") == (2, "none")
    assert group("--dp", "1") == (1, "none")
