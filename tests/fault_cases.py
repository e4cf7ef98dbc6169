"""Faults a group must survive, each against real processes: a driver (a script using `LLM`, or the `sidp`
command) on a tiny model with real replicas, started in a session of its own as a terminal starts a
job; a fault done to it; then how long its processes took to end and what they left behind (processes,
/dev/shm entries, /tmp/pymp-* folders). tests/test_faults.py runs every case once;
benchmarks/fault_soak.py runs each many times and records the figures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from helpers import over_runtime

STOP_S = 5.0  # every replica of a group told to stop (or one of whose replicas died) is gone within this
ORPHAN_S = 2.0  # a replica whose driver died is gone within this
EXIT_S = 30.0  # the driver itself (and multiprocessing's resource tracker) is gone within this
START_S = 120.0  # generous: the machine may be busy
_started: list[subprocess.Popen] = []  # drivers of the running case, killed whatever ends it

DRIVER = """
import json, sys, time
from sidp import LLM, SamplingParams
from sidp.runtime_memory import runtime_bytes, tokenizer_bytes

def say(*words):
    print(*words, flush=True)

if __name__ == "__main__":
    case = json.loads(sys.argv[1])
    # A lone replica runs in this process, beside the driver's tokenizer: counted too.
    budget = runtime_bytes("cpu") + tokenizer_bytes(case["model"], "cpu") + 64 * 2**20
    kwargs = dict(dtype="float32", memory_per_replica=budget, max_num_seqs=2,
                  data_parallel_size=case["dp"], weight_sharing=case["sharing"])
    if case["mode"]:
        kwargs["sidp_mode"] = case["mode"]
    scenario = case["scenario"]
    if scenario == "with":
        with LLM(case["model"], **kwargs) as llm:
            llm.generate([[5] * 20] * 4, SamplingParams(max_tokens=8), use_tqdm=False)
            say("generated")
        say("closed")
        time.sleep(60)
        sys.exit(0)
    llm = LLM(case["model"], **kwargs)
    say("started")
    if scenario == "unused":
        sys.exit(0)
    if scenario == "finish":
        llm.generate([[5] * 20] * 4, SamplingParams(max_tokens=8), use_tqdm=False)
        say("generated")
        sys.exit(0)
    if scenario == "idle":
        time.sleep(60)
    if scenario == "scope":
        del llm
        say("deleted")
        time.sleep(60)
    if scenario == "raise":
        raise ValueError("a bug in the user's script")

    def on_output(index, output):
        if scenario == "raise_in_callback":
            raise ValueError("the user's callback failed")

    say("generating")
    llm.generate([[5] * 20] * 400, SamplingParams(max_tokens=900, ignore_eos=True), use_tqdm=False,
                 on_output=on_output)
    say("done")
"""


@dataclass
class Outcome:
    """What one run of a case measured. stop_s: from the fault to the last replica gone (N=1: to the
    driver's exit); left: anything that remained (a replica after its limit, the driver or the resource
    tracker after EXIT_S, /dev/shm entries, /tmp/pymp-* folders) or a missing message."""

    case: str  # set by run_case
    stop_s: float
    returncode: int | None
    left: list[str] = field(default_factory=list)
    stderr_tail: str = ""


class Driver:
    """A driver started in its own session (so a signal to its process group reaches it and its
    replicas as a terminal's Ctrl-C does, and nothing else)."""

    def __init__(self, argv: list[str], workdir: Path):
        self.shm_before = set(os.listdir("/dev/shm"))
        self.pymp_before = set(Path(tempfile.gettempdir()).glob("pymp-*"))
        self.stderr_path = workdir / "stderr.txt"
        with self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
                cwd=workdir,
                preexec_fn=_as_a_terminal_job,
            )
        _started.append(self.proc)
        self.group: set[int] = set()
        self.replicas: set[int] = set()

    def wait_for(self, word: str) -> None:
        """Read the driver's lines until one says `word`, noting its processes as they are then."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the driver ended before saying {word!r}: {self.stderr()[-800:]}")
            if line.split()[0] == word:
                self.note_group()
                return

    def mid_run(self) -> None:
        """Wait until the script is a second into its generate call."""
        self.wait_for("generating")
        time.sleep(1.0)

    def somewhere_in_start_up(self) -> None:
        """Wait until the replicas exist (with multiprocessing's resource tracker), then 0-3 s more:
        importing, loading or exchanging the pool."""
        while len(self.group) < 3:
            self.note_group()
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 3.0))
        self.note_group()

    def note_group(self) -> None:
        self.group |= descendants(self.proc.pid)
        self.replicas |= {pid for pid in self.group if comm(pid).startswith("sidp-replica")}

    def signal_group(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def ended(self, since: float, limit_s: float, keep_driver: bool = False) -> Outcome:
        """Wait up to limit_s for the replicas to end, then up to EXIT_S for the driver and the resource
        tracker (unless keep_driver: the script lives on, and so does the tracker, its child)."""
        others = {self.proc.pid} | {p for p in self.group if "resource_tracker" in cmdline(p)}
        replicas = self.group - others
        alive = _wait_until_gone(replicas, since + limit_s, self.proc)
        stop_s = time.monotonic() - since
        if not keep_driver:
            alive += _wait_until_gone(others, since + EXIT_S, self.proc)
        if not replicas:  # one replica, in the driver: its stop is the driver's exit
            stop_s = time.monotonic() - since
        unseen = ["no replica was seen to watch"] if keep_driver and not self.replicas else []
        if keep_driver:
            self.proc.kill()
        left = unseen + [f"process {pid} ({comm(pid)})" for pid in alive]
        code = self.proc.wait(30)
        self.proc.stdout.close()
        time.sleep(0.2)  # let the kernel finish tearing down what the last process held
        left += [f"/dev/shm/{name}" for name in set(os.listdir("/dev/shm")) - self.shm_before]
        left += [str(p) for p in set(Path(tempfile.gettempdir()).glob("pymp-*")) - self.pymp_before]
        return Outcome("", round(stop_s, 3), code, left, self.stderr()[-1500:])


def _as_a_terminal_job() -> None:
    """In the driver before it starts: SIGINT as a foreground job has it. A shell's background job (a
    CI runner, nohup, `&`) ignores SIGINT, and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def _wait_until_gone(pids: set[int], deadline: float, driver: subprocess.Popen) -> list[int]:
    """The pids still alive at the deadline (the driver is reaped as it ends, so it does not linger)."""
    while (alive := live(pids)) and time.monotonic() < deadline:
        driver.poll()
        time.sleep(0.02)
    return alive


def descendants(pid: int) -> set[int]:
    """pid's processes and all theirs, as /proc shows them now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def live(pids: set[int]) -> list[int]:
    """The pids still running (a zombie holds nothing and counts as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


# --- the cases ---------------------------------------------------------------------------------------


def script(workdir: Path, model: Path, scenario: str, dp: int = 2, mode: str | None = "cas") -> Driver:
    path = workdir / "driver.py"
    path.write_text(DRIVER)
    sharing = "sidp" if mode else "none"
    case = {"model": str(model), "dp": dp, "sharing": sharing, "mode": mode, "scenario": scenario}
    return Driver([sys.executable, str(path), json.dumps(case)], workdir)


def interrupted(signum: int, to_group: bool, mode: str | None, dp: int = 2, twice: bool = False):
    """Ctrl-C (or SIGTERM) mid-run: the driver raises KeyboardInterrupt saying how far it got."""

    def run(workdir: Path, model: Path) -> Outcome:
        driver = script(workdir, model, "generate", dp, mode)
        driver.mid_run()
        started = time.monotonic()
        for _ in range(2 if twice else 1):
            driver.signal_group(signum) if to_group else os.kill(driver.proc.pid, signum)
            time.sleep(0.05)
        outcome = driver.ended(started, STOP_S)
        if "KeyboardInterrupt: interrupted:" not in outcome.stderr_tail and not twice:
            outcome.left.append("no line saying what was done")
        return outcome

    return run


def interrupted_starting():
    """Ctrl-C while the replicas start (importing, loading, exchanging the pool)."""

    def run(workdir: Path, model: Path) -> Outcome:
        driver = script(workdir, model, "generate", mode="cas")
        driver.somewhere_in_start_up()
        started = time.monotonic()
        driver.signal_group(signal.SIGINT)
        outcome = driver.ended(started, STOP_S)
        if "KeyboardInterrupt" not in outcome.stderr_tail:
            outcome.left.append("no KeyboardInterrupt from the driver")
        return outcome

    return run


def user_error(scenario: str, after: str, limit_s: float = STOP_S):
    """The user's script raises (mid-run from a callback, or before any call), or just ends (after its
    calls, or without any)."""

    def run(workdir: Path, model: Path) -> Outcome:
        driver = script(workdir, model, scenario)
        driver.wait_for(after)
        outcome = driver.ended(time.monotonic(), limit_s)
        if scenario.startswith("raise") and "ValueError" not in outcome.stderr_tail:
            outcome.left.append("the user's exception was not raised")
        if not scenario.startswith("raise") and outcome.returncode != 0:
            outcome.left.append(f"exit status {outcome.returncode}, not 0")
        return outcome

    return run


def released(scenario: str, after: str):
    """The LLM goes out of scope or leaves its `with` block: its replicas end while the script lives."""

    def run(workdir: Path, model: Path) -> Outcome:
        driver = script(workdir, model, scenario)
        driver.wait_for("started" if scenario == "scope" else "generated")
        driver.wait_for(after)
        return driver.ended(time.monotonic(), STOP_S, keep_driver=True)

    return run


def driver_killed(when: str, mode: str | None):
    """SIGKILL of the driver (as `kill -9` or the OOM killer): every replica follows it."""

    def run(workdir: Path, model: Path) -> Outcome:
        driver = script(workdir, model, "idle" if when == "idle" else "generate", mode=mode)
        limit = ORPHAN_S
        if when == "starting":
            driver.somewhere_in_start_up()  # a replica still importing notices when its imports end
            limit = START_S
        else:
            driver.wait_for("started") if when == "idle" else driver.mid_run()
        started = time.monotonic()
        os.kill(driver.proc.pid, signal.SIGKILL)
        return driver.ended(started, limit)

    return run


def replica_killed(mode: str):
    """SIGKILL of one replica mid-run: the driver stops the group and names the replica."""

    def run(workdir: Path, model: Path) -> Outcome:
        driver = script(workdir, model, "generate", mode=mode)
        driver.mid_run()
        victim = max(driver.replicas)
        started = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        outcome = driver.ended(started, STOP_S)
        if "SidpError: Replica" not in outcome.stderr_tail:
            outcome.left.append("no error naming the replica")
        return outcome

    return run


def group_killed():
    """SIGKILL of the whole process group: nothing can clean up, and nothing needs to."""

    def run(workdir: Path, model: Path) -> Outcome:
        driver = script(workdir, model, "generate", mode="auto")
        driver.mid_run()
        started = time.monotonic()
        driver.signal_group(signal.SIGKILL)
        return driver.ended(started, STOP_S)

    return run


def cli_interrupted(command: str):
    """Ctrl-C to `sidp generate` (a batch job: exit 130 and a line with what is written) or `sidp bench`."""

    def run(workdir: Path, model: Path) -> Outcome:
        output = workdir / "out.jsonl"
        argv = [sys.executable, "-m", "sidp.cli", command, "--model", str(model), "--dtype", "float32"]
        argv += ["--memory-per-replica", over_runtime("64MiB"), "--dp", "2", "--max-num-seqs", "2"]
        if command == "generate":
            source = workdir / "in.jsonl"
            lines = [{"id": f"r{i}", "prompt": f"request {i}", "max_tokens": 900} for i in range(200)]
            source.write_text("".join(json.dumps(x) + "\n" for x in lines))
            argv += ["--input", str(source), "--output", str(output), "--quiet", "--temperature", "0"]
        else:
            argv += ["--baseline", "none", "--num-requests", "200", "--output-len", "900"]
            argv += ["--input-len", "20", "--out", str(workdir / "bench.json")]
        driver = Driver(argv, workdir)
        wait_until = time.monotonic() + START_S
        while time.monotonic() < wait_until and not (output.exists() and output.read_bytes().count(b"\n")):
            driver.note_group()
            if command == "bench" and len(driver.group) >= 3:
                time.sleep(8.0)  # well into the run
                break
            time.sleep(0.05)
        driver.note_group()
        started = time.monotonic()
        driver.signal_group(signal.SIGINT)
        outcome = driver.ended(started, STOP_S)
        if outcome.returncode != 130:
            outcome.left.append(f"exit status {outcome.returncode}, not 130")
        if command == "generate":
            written = output.read_bytes().count(b"\n")
            if f"sidp: interrupted: {written} results of this run are safely in" not in outcome.stderr_tail:
                outcome.left.append(f"no line saying that {written} results are written")
        return outcome

    return run


CASES: dict[str, Callable[[Path, Path], Outcome]] = {
    "ctrl-c to the process group, plain DP": interrupted(signal.SIGINT, True, None),
    "ctrl-c to the process group, SiDP map": interrupted(signal.SIGINT, True, "map"),
    "ctrl-c to the process group, SiDP was": interrupted(signal.SIGINT, True, "was"),
    "ctrl-c to the process group, SiDP cas": interrupted(signal.SIGINT, True, "cas"),
    "ctrl-c to the process group, SiDP auto": interrupted(signal.SIGINT, True, "auto"),
    "ctrl-c to the process group while replicas start": interrupted_starting(),
    "ctrl-c to the driver alone, SiDP cas": interrupted(signal.SIGINT, False, "cas"),
    "ctrl-c twice, SiDP cas": interrupted(signal.SIGINT, True, "cas", twice=True),
    "SIGTERM to the driver, SiDP auto": interrupted(signal.SIGTERM, False, "auto"),
    "ctrl-c to the process group, one replica (N=1)": interrupted(signal.SIGINT, True, None, dp=1),
    "exception in a callback mid-run": user_error("raise_in_callback", "generating"),
    "exception in the script after start": user_error("raise", "started"),
    "script ends after generate, no close()": user_error("finish", "generated"),
    "LLM built and never used, script ends": user_error("unused", "started"),
    "LLM goes out of scope": released("scope", "deleted"),
    "LLM used as a context manager": released("with", "closed"),
    "driver SIGKILLed while replicas start": driver_killed("starting", "cas"),
    "driver SIGKILLed while the group idles": driver_killed("idle", "cas"),
    "driver SIGKILLed mid-step, plain DP": driver_killed("step", None),
    "driver SIGKILLed mid-CaS": driver_killed("step", "cas"),
    "driver SIGKILLed mid-WaS": driver_killed("step", "was"),
    "replica SIGKILLed mid-CaS": replica_killed("cas"),
    "replica SIGKILLed mid-WaS": replica_killed("was"),
    "process group SIGKILLed": group_killed(),
    "ctrl-c to sidp generate (batch job)": cli_interrupted("generate"),
    "ctrl-c to sidp bench": cli_interrupted("bench"),
}


def run_case(name: str, workdir: Path, model: Path) -> Outcome:
    try:
        outcome = CASES[name](workdir, model)
    finally:  # a case that failed half-way (or was interrupted) leaves no driver running on
        for proc in _started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _started.clear()
    outcome.case = name
    return outcome
