"""Start the ranks of a SiDP group of vLLM processes: the same command once per rank, each told its rank,
the group size and a fresh group name, each bound to its own share of the CPUs.

    python -m sidp.vllm_plugin.launch --ranks 2 -- python my_vllm_script.py ARGS

A rank's script is an ordinary vLLM script (one `LLM`); it may read SIDP_VLLM_RANK and SIDP_VLLM_SIZE to
take its share of the prompts. `--without-sidp` runs the same ranks as plain data parallelism (the
variables but SIDP_VLLM_GROUP set), for a comparison. Each rank runs in a session of its own; should one
fail, or Ctrl-C or SIGTERM come, every rank still running is stopped as `sidp bench` stops its vLLM
peer: SIGINT (vLLM then unlinks its shared memory), and after a grace period SIGKILL and the unlinking
of whatever /dev/shm entries its processes held.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence

from sidp.bench.peer_vllm import stop_group
from sidp.errors import SidpError
from sidp.pool.placement import Placement
from sidp.signals import sigterm_interrupts
from sidp.vllm_plugin import settings

GRACE_S = 15.0
POLL_S = 0.2


def rank_env(
    environ: Mapping[str, str], group: str | None, rank: int, size: int, cpus: list[int] | None
) -> dict:
    """`environ` as rank `rank` of `size` sees it: its identity, the group (None: plain data parallelism),
    and the CPUs its vLLM binds its threads to."""
    env = {**environ, settings.RANK: str(rank), settings.SIZE: str(size)}
    env.pop(settings.GROUP, None)
    if group is not None:
        env[settings.GROUP] = group
    if cpus is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
    return env


def split_cpus(size: int) -> list[list[int]]:
    """This process's CPUs in `size` contiguous shares, as even as they go (sidp's contiguous placement,
    of CPUs instead of layers)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < size:
        raise SidpError(
            f"{size} ranks need at least {size} CPUs and this process may use {len(cpus)}: "
            "start fewer ranks, or pass --no-bind and bind them yourself."
        )
    shares = Placement.build(len(cpus), size, "contiguous")
    return [[cpus[i] for i in shares.owned_by(rank)] for rank in range(size)]


def launch(
    command: Sequence[str], size: int, sidp: bool = True, bind: bool = True, group: str | None = None
) -> int:
    """Run `command` as `size` ranks; 0 if every rank succeeded, else the first failure's exit status."""
    group = (group or f"sidp-{uuid.uuid4().hex[:12]}") if sidp else None
    shares = split_cpus(size) if bind else [None] * size
    procs: list[subprocess.Popen] = []
    with sigterm_interrupts():
        try:
            for rank in range(size):
                env = rank_env(os.environ, group, rank, size, shares[rank])
                procs.append(subprocess.Popen(list(command), env=env, start_new_session=True))
            return _wait(procs)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        stop_group(proc.pid, GRACE_S, reap=proc.poll)


def _wait(procs: list[subprocess.Popen]) -> int:
    """Until all ranks succeed (0) or one fails (its status; the caller stops the others)."""
    while True:
        statuses = [proc.poll() for proc in procs]
        failed = next((s for s in statuses if s not in (None, 0)), None)
        if failed is not None:
            rank = statuses.index(failed)
            print(
                f"sidp launch: rank {rank} exited with status {failed}; stopping the others.", file=sys.stderr
            )
            return failed
        if all(s == 0 for s in statuses):
            return 0
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sidp.vllm_plugin.launch",
        description="Run a vLLM script as the ranks of a SiDP group (one process each).",
    )
    parser.add_argument("--ranks", type=int, required=True, help="how many ranks (processes)")
    parser.add_argument("--group", help="the group's name (default: a fresh one)")
    parser.add_argument("--without-sidp", action="store_true", help="plain data parallelism, for comparison")
    parser.add_argument(
        "--no-bind",
        action="store_true",
        help="leave VLLM_CPU_OMP_THREADS_BIND as it is (default: split the CPUs)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each rank runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.ranks < 1:
        parser.error("give --ranks N (at least 1) and, after --, the command each rank runs")
    try:
        status = launch(command, args.ranks, not args.without_sidp, not args.no_bind, args.group)
    except SidpError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)


if __name__ == "__main__":
    main()
