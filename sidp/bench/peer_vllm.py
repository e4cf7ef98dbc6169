"""vLLM on `sidp bench`'s workload: the side-by-side peer of `sidp bench --peer vllm`.

Runs as a file under the python of vLLM's own venv, which has no sidp, so it imports only the standard
library and vLLM. sidp writes the workload (the same token ids and output lengths it times itself);
this times one `generate` after the warm-up, prints vLLM's throughput line and writes the result.

    PEER_PYTHON sidp/bench/peer_vllm.py --model DIR --workload W.json --dtype bfloat16 --out R.json

With --profile, the timed `generate` runs under torch's profiler and the result carries each op's self
CPU time (benchmarks/profile_bench.py groups them). The profiler sees only its own process, so the engine
then runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which needs PyTorch's libgomp preloaded
for the thread binding to use every core: the runner restarts itself with both set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

MIN_MODEL_LEN = 2048  # what vLLM's CPU figures in docs/BENCHMARKS.md were measured with


def main() -> None:
    args = parse_args()
    if args.profile:
        restart_in_process()
    stop_with_parent(os.getppid())
    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}  # as given, before vLLM adds its own
    import vllm  # here, not at the top: sidp imports the helpers below without vLLM

    timed, warmup = read_workload(args.workload)
    max_model_len = model_len(timed + warmup)
    llm = vllm.LLM(
        model=args.model, dtype=args.dtype, enable_prefix_caching=False, max_model_len=max_model_len, seed=0
    )

    def generate(requests: list[tuple[list[int], int]]) -> list:
        prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
        params = [vllm.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
        return llm.generate(prompts, params, use_tqdm=False)

    if warmup:
        generate(warmup)
    profiler = None
    if args.profile:
        import torch

        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profiler.start()
    started = time.perf_counter()
    outputs = generate(timed)
    elapsed = time.perf_counter() - started
    if profiler is not None:
        profiler.stop()
    for i, (out, (_, n)) in enumerate(zip(outputs, timed, strict=True)):
        if len(out.outputs[0].token_ids) != n:  # throughput counted from the request would be wrong
            sys.exit(f"vLLM returned {len(out.outputs[0].token_ids)} tokens for request {i}, not {n}.")
    result = {
        "engine": "vllm",
        "version": vllm.__version__,
        "dtype": args.dtype,
        "elapsed_s": elapsed,
        "num_requests": len(timed),
        "prompt_tokens": sum(len(ids) for ids, _ in timed),
        "output_tokens": sum(n for _, n in timed),
        "max_num_seqs": llm.llm_engine.vllm_config.scheduler_config.max_num_seqs,
        "max_model_len": max_model_len,
        "prefix_caching": False,
        "env": env,
    }
    if profiler is not None:
        result["ops"] = op_times(profiler)
    print(throughput_line(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="vLLM on a workload that `sidp bench` wrote")
    parser.add_argument(
        "--model", required=True, help="a Hugging Face folder (config, safetensors, tokenizer)"
    )
    parser.add_argument(
        "--workload", type=Path, required=True, help="JSON: {timed: [[ids, n]], warmup: [...]}"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, required=True, help="the result, as JSON")
    parser.add_argument("--profile", action="store_true", help="time each op of the timed generate")
    return parser.parse_args(argv)


def op_times(profiler) -> dict[str, dict]:
    """Each op's self CPU time (s) and calls, from a finished torch profiler (shared with sidp's profile)."""
    return {
        e.key: {"self_s": e.self_cpu_time_total / 1e6, "calls": e.count}
        for e in profiler.key_averages()
        if e.self_cpu_time_total > 0
    }


def stop_with_parent(parent: int, every_s: float = 0.5, grace_s: float = 15.0) -> None:
    """Once `parent`, the sidp that started this runner, has gone (killed, it cannot stop the runner), stop
    the runner's process group as sidp would (sidp/bench/peer.py): SIGINT to all of it, on which vLLM's
    processes shut down and unlink their shared memory, and SIGKILL to what is left after `grace_s`.
    The runner leads its group (sidp starts it in a session of its own). Output goes to /dev/null from then
    on: the pipe sidp read is closed."""
    # Stopping means SIGINT, from sidp or from the watcher below, even where this process was started with
    # it ignored, as a shell does for a background job: on it, vLLM unlinks its shared memory as it shuts
    # down. (Only the main thread may set a handler, and this is called from it.)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        quiet = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(quiet, fd)
        # Only a group of its own: started otherwise, the group would be someone else's too.
        group = os.getpgid(0) if os.getpgid(0) == os.getpid() else None
        if group is None:
            os.kill(os.getpid(), signal.SIGINT)
            return
        stop_group(group, grace_s, spare=os.getpid())
        # The runner got the SIGINT too: its main thread shuts vLLM's engine down (and unlinks what it
        # holds) unless killed first, so give it the same grace before leaving.
        threading.main_thread().join(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="sidp-peer-lifeline", daemon=True).start()


def stop_group(group: int, grace_s: float, spare: int | None = None, reap=lambda: None) -> None:
    """SIGINT to process group `group`, on which vLLM shuts down and unlinks its shared memory; after
    `grace_s`, if any process of it but `spare` is still there, kill_group. `reap`: reap exited children
    (a zombie still counts as in the group)."""
    os.killpg(group, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        reap()
        if not any(_alive(pid) for pid in _pids() if pid != spare and _group_of(pid) == group):
            return
        time.sleep(0.1)
    kill_group(group, spare)


def kill_group(group: int, spare: int | None = None) -> None:
    """SIGKILL every process of `group` (but `spare`), then unlink what they had mapped from /dev/shm:
    vLLM's segments and semaphores, which a killed process cannot unlink and nobody else would."""
    in_group = [pid for pid in _pids() if _group_of(pid) == group]
    mapped = {path for pid in in_group for path in _shm_mapped(pid)}  # the spared one's too: it ends next
    # multiprocessing's resource tracker is left to end by itself: once its clients are gone, it unlinks
    # what they registered and did not unlink, segments none of them still had mapped among them.
    members = [pid for pid in in_group if pid != spare and not _is_resource_tracker(pid)]
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in members) and time.monotonic() < deadline:
        time.sleep(0.05)
    for path in mapped:
        with contextlib.suppress(FileNotFoundError):  # its owner unlinked it in time after all
            os.unlink(path)


def _is_resource_tracker(pid: int) -> bool:
    try:
        return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces): state, ppid, pgrp, ..."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text[text.rindex(")") + 2 :].split()


def _group_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"  # a zombie holds no memory any more


def _shm_mapped(pid: int) -> set[str]:
    """The /dev/shm entries `pid` has mapped or open."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    paths = [line.split(maxsplit=5)[-1] for line in lines if " /dev/shm/" in line]
    for fd in fds:
        with contextlib.suppress(OSError):
            paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    # " (deleted)": unlinked already
    return {path for path in paths if path.startswith("/dev/shm/") and not path.endswith(" (deleted)")}


def restart_in_process() -> None:
    """Exec this runner again with the engine in this process and PyTorch's libgomp preloaded, unless
    that is how it runs already."""
    preload = os.environ.get("LD_PRELOAD", "")
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and "gomp" in preload:
        return
    import glob
    import importlib.util

    torch_dir = Path(importlib.util.find_spec("torch").origin).parent  # without importing torch
    found = sorted(glob.glob(str(torch_dir / "lib" / "libgomp*.so*")))
    if not found:
        sys.exit(f"--profile: no libgomp under {torch_dir / 'lib'} to preload for vLLM's thread binding.")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env["LD_PRELOAD"] = ":".join(filter(None, [preload, found[0]]))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def read_workload(path: Path) -> tuple[list[tuple[list[int], int]], list[tuple[list[int], int]]]:
    """The timed and warm-up requests as (prompt token ids, output length)."""
    workload = json.loads(path.read_text(encoding="utf-8"))
    return [(ids, n) for ids, n in workload["timed"]], [(ids, n) for ids, n in workload["warmup"]]


def model_len(requests: list[tuple[list[int], int]]) -> int:
    return max(MIN_MODEL_LEN, *(len(ids) + n for ids, n in requests))


def throughput_line(result: dict) -> str:
    """vLLM's benchmark_throughput line, from the counts of the timed requests."""
    elapsed = result["elapsed_s"]
    total = result["prompt_tokens"] + result["output_tokens"]
    return (
        f"Throughput: {result['num_requests'] / elapsed:.2f} requests/s, {total / elapsed:.2f} "
        f"total tokens/s, {result['output_tokens'] / elapsed:.2f} output tokens/s"
    )


if __name__ == "__main__":
    main()
