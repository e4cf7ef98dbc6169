"""Batch jobs: OpenAI Batch and plain lines in, results out as they finish, resumable, bad lines
recorded without costing good ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import cli_engine_args as engine_args
from helpers import new_shm_entries, shm_entries

from sidp.batch.formats import content_id
from sidp.batch.output import OutputFile
from sidp.cli import main

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def model(tiny_model):
    return str(tiny_model("llama"))


def openai_line(custom_id: str, chat: bool = True, **body) -> dict:
    url = "/v1/chat/completions" if chat else "/v1/completions"
    source = {"messages": CHAT} if chat else {"prompt": "once upon a time"}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "m", **source, **body}}


def write_lines(path, lines) -> None:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))


def read_output(path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().split("\n") if line]
    by_id = {r.get("custom_id", r.get("id")): r for r in rows}
    assert len(by_id) == len(rows), "an id appears twice"
    return by_id


def generate(model: str, source, target, *extra: str) -> int:
    return main(["generate", *engine_args(model), "--input", str(source), "--output", str(target), *extra])


def test_openai_and_plain_lines_get_answers_in_their_own_format(model, tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        openai_line("chat-1", max_tokens=4, temperature=0),
        openai_line("text-1", chat=False, max_completion_tokens=3, temperature=0),
        {"id": "plain-1", "prompt": "hi", "max_tokens": 5, "ignore_eos": True},
    ]
    write_lines(source, lines)
    assert generate(model, source, target, "--temperature", "0") == 0
    out = read_output(target)
    chat = out["chat-1"]
    assert chat["id"] == "batch_req_chat-1" and chat["error"] is None
    body = chat["response"]["body"]
    assert chat["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    text = out["text-1"]["response"]["body"]
    assert text["object"] == "text_completion" and "text" in text["choices"][0]
    assert text["usage"]["completion_tokens"] <= 3
    assert out["plain-1"]["completion_tokens"] == 5 and "text" in out["plain-1"]
    assert (tmp_path / "out.errors.jsonl").read_text() == ""


def test_every_kind_of_bad_line_is_recorded_and_the_good_lines_finish(model, tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"id": "good-1", "prompt": "one", "max_tokens": 2},
        b"{not json",
        {"id": "odd", "prompt": "x", "colour": "blue"},
        {"id": "long", "prompt": "word " * 1200},
        {"id": "empty", "prompt": ""},
        b'{"id": "bytes", "prompt": "caf\xe9"}',
        {"id": "good-1", "prompt": "again"},
        openai_line("many", n=2),
        {"id": "cold", "prompt": "x", "temperature": -1},
        openai_line("good-2", max_tokens=2),
    ]
    write_lines(source, lines)
    assert generate(model, source, target) == 1
    assert set(read_output(target)) == {"good-1", "good-2"}
    errors = {e["line"]: e["error"] for e in map(json.loads, (tmp_path / "out.errors.jsonl").open())}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "not valid JSON" in errors[2]
    assert "unknown field(s) colour" in errors[3]
    assert "max_model_len" in errors[4]
    assert "non-empty" in errors[5]
    assert "not UTF-8" in errors[6]
    assert "duplicate id 'good-1' (first on line 1)" in errors[7]
    assert "n must be 1" in errors[8]
    assert "temperature" in errors[9]
    err = capsys.readouterr().err
    assert "2 ok, 0 already done, 8 failed" in err


def test_strict_stops_at_the_first_bad_line_before_any_work(model, tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, [{"id": "a", "prompt": "x"}, b"{broken"])
    assert generate(model, source, target, "--strict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sidp: error: {source} line 2: not valid JSON")
    assert not target.exists() or target.read_text() == ""


def test_a_rerun_skips_finished_ids_and_drops_a_cut_line(model, tmp_path):
    source = tmp_path / "in.jsonl"
    write_lines(source, [{"id": f"r{i}", "prompt": f"line {i}", "max_tokens": 6} for i in range(6)])
    whole = tmp_path / "whole.jsonl"
    assert generate(model, source, whole, "--temperature", "0") == 0
    reference = read_output(whole)
    # An interrupted run: three results written, the fourth cut off mid-line.
    kept = whole.read_text().split("\n")[:3]
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(kept) + "\n" + kept[0][:17])
    assert generate(model, source, partial, "--temperature", "0") == 0
    assert read_output(partial) == reference


@pytest.fixture(scope="module")
def group_job(model, tmp_path_factory) -> tuple[list[str], dict[str, dict]]:
    """The command of a two-replica job over 24 requests, and the results of an uninterrupted run of it."""
    folder = tmp_path_factory.mktemp("group-job")
    source, whole = folder / "in.jsonl", folder / "whole.jsonl"
    write_lines(source, [{"id": f"r{i}", "prompt": f"request {i}", "max_tokens": 24} for i in range(24)])
    argv = [sys.executable, "-m", "sidp.cli", "generate", *engine_args(model), "--temperature", "0"]
    argv += ["--dp", "2", "--max-num-seqs", "2", "--input", str(source)]
    assert subprocess.run([*argv, "--output", str(whole)], capture_output=True, timeout=300).returncode == 0
    return argv, read_output(whole)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_job_killed_at_a_random_point_resumes_to_the_same_results(group_job, tmp_path, seed):
    """SIGKILL a real `sidp generate` process (the driver of two replicas, as `kill -9 PID` or the OOM
    killer would) after a random number of results, then rerun the same command: every id once, the
    same greedy outputs as an uninterrupted run, nothing left in /dev/shm."""
    argv, whole = group_job
    target = tmp_path / "out.jsonl"
    shm_before = shm_entries()
    kill_after = 1 + (seed * 7) % 20
    job = subprocess.Popen([*argv, "--output", str(target)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while job.poll() is None and time.monotonic() < deadline:
        if target.exists() and target.read_bytes().count(b"\n") >= kill_after:
            os.kill(job.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert job.wait(timeout=30) == -signal.SIGKILL  # killed mid-job, not finished before the kill
    assert target.read_bytes().count(b"\n") < 24
    assert subprocess.run([*argv, "--output", str(target)], capture_output=True, timeout=300).returncode == 0
    assert read_output(target) == whole
    assert not new_shm_entries(shm_before, wait_s=10)  # the orphaned replicas notice and exit


def test_nodes_split_the_input_by_id_and_merge_joins_their_parts(model, tmp_path, monkeypatch):
    from sidp.batch.shard import node_of, nodes_from_env

    source, single, split = tmp_path / "in.jsonl", tmp_path / "one.jsonl", tmp_path / "split.jsonl"
    lines = [{"id": f"r{i}", "prompt": f"line {i}", "max_tokens": 4} for i in range(10)]
    write_lines(source, [*lines, b"{bad", {"id": "r0", "prompt": "dup"}])
    assert generate(model, source, single, "--temperature", "0") == 1
    owners = {node_of(x["id"], 2) for x in lines}
    assert owners == {0, 1} and node_of("r3", 2) == node_of("r3", 2)
    for rank in (0, 1):
        generate(model, source, split, "--temperature", "0", "--num-nodes", "2", "--node-rank", str(rank))
    part = tmp_path / "split.part-000-of-002.jsonl"
    assert part.exists() and not split.exists()
    assert main(["merge", str(split)]) == 0
    assert read_output(split) == read_output(single)
    errors = [json.loads(x) for x in (tmp_path / "split.errors.jsonl").read_text().split("\n") if x]
    assert [e["line"] for e in errors] == [11, 12]  # each bad line recorded by one node only
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("GROUP_RANK", "3")
    assert nodes_from_env() == (4, 3)


def test_merge_refuses_missing_parts(tmp_path, capsys):
    (tmp_path / "out.part-000-of-002.jsonl").write_text('{"id": "a"}\n')
    assert main(["merge", str(tmp_path / "out.jsonl")]) == 2
    assert "not one from each node" in capsys.readouterr().err


def test_a_budget_too_small_for_the_model_fails_in_one_line_before_any_work(model, tmp_path):
    source = tmp_path / "in.jsonl"
    write_lines(source, [{"id": "a", "prompt": "x"}])
    argv = [sys.executable, "-m", "sidp.cli", "generate", "--model", model, "--dp", "2", "--quiet"]
    argv += ["--memory-per-replica", "1MiB", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "cannot hold this model" in lines[0], run.stderr
    assert (tmp_path / "o.jsonl").read_text() == ""


def test_a_stop_string_ends_the_text_before_it_as_vllm_does(model, tmp_path):
    source, free, stopped = tmp_path / "in.jsonl", tmp_path / "free.jsonl", tmp_path / "stopped.jsonl"
    write_lines(source, [openai_line("a", chat=False, max_tokens=40, temperature=0, ignore_eos=True)])
    assert generate(model, source, free) == 0
    body = read_output(free)["a"]["response"]["body"]
    text = body["choices"][0]["text"]
    assert len(text) > 20 and body["usage"]["completion_tokens"] == 40
    stop = text[12:15]
    line = openai_line("a", chat=False, max_tokens=40, temperature=0, ignore_eos=True, stop=stop)
    write_lines(source, [line])
    assert generate(model, source, stopped) == 0
    body = read_output(stopped)["a"]["response"]["body"]
    assert body["choices"][0]["text"] == text[: text.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 40


def test_lines_without_id_are_named_by_content_so_an_edited_input_still_resumes(model, tmp_path):
    """Ids follow a line's content, not its place: a rerun on an input with lines added in front and
    reordered serves only the new lines; the same content twice is two requests."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    first = [{"prompt": f"line {i}", "max_tokens": 4} for i in range(3)]
    write_lines(source, first)
    assert generate(model, source, target, "--temperature", "0") == 0
    done = read_output(target)
    assert set(done) == {content_id(x) for x in first}
    added = {"prompt": "a new first line", "max_tokens": 4}
    write_lines(source, [added, first[2], first[0], first[1], first[0]])
    assert generate(model, source, target, "--temperature", "0") == 0
    after = read_output(target)
    assert set(after) == set(done) | {content_id(added), content_id(first[0]) + "-2"}
    assert all(after[i] == done[i] for i in done)  # the earlier results, untouched and not redone


def test_a_second_run_on_the_same_output_is_refused_before_the_model_loads(model, tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, [{"id": "a", "prompt": "x", "max_tokens": 2}])
    holder = OutputFile(target)  # what a run in another process holds while it works
    try:
        assert generate(model, source, target) == 2
        err = capsys.readouterr().err
        assert f"Another sidp run is writing {target}" in err and "KV cache" not in err
    finally:
        holder.close()
    assert generate(model, source, target, "--fsync") == 0  # free again once its holder has gone
    assert list(read_output(target)) == ["a"]
