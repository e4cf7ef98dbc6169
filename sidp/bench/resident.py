"""What each replica process really holds while the bench runs, to set beside its memory budget.

PSS (proportional set size) counts a page shared by k processes as 1/k in each, so the replicas' PSS add
up to what the group takes from the machine, and weights pooled in shared memory count once. The kernel
keeps no peak of PSS, so a thread reads each process's /proc/PID/smaps_rollup every `interval_s` and keeps
the largest; a peak shorter than that can be missed. Each read walks the process's page tables, which
took 90-170 ms for a replica with 12 GB of KV cache touched (a sampler reading that every 0.25 s cost the
bench a third of its speed), so the sampler waits at least COST_RATIO times as long as its last read took:
it takes at most 1/COST_RATIO of one core. VmHWM, the kernel's exact peak of RSS, bounds it from above (it
counts shared pages in full in every process).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

INTERVAL_S = 0.25
COST_RATIO = 40


def _status_kib(path: Path, field: str) -> int | None:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, ValueError):  # the process has gone, or this is not Linux
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def pss_bytes(pid: int) -> int | None:
    kib = _status_kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss")
    return None if kib is None else kib * 1024


def rss_bytes(pid: int) -> int | None:
    kib = _status_kib(Path(f"/proc/{pid}/status"), "VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes(pid: int) -> int | None:
    kib = _status_kib(Path(f"/proc/{pid}/status"), "VmHWM")
    return None if kib is None else kib * 1024


class PeakPss:
    """`with PeakPss(pids) as peaks:` samples the processes' PSS until the block ends; then `peaks.pss`
    holds each one's largest sample (None where none could be read) and `peaks.rss` its VmHWM."""

    def __init__(self, pids: list[int], interval_s: float = INTERVAL_S):
        self.pids = list(pids)
        self.interval_s = interval_s
        self.pss: list[int | None] = [None] * len(self.pids)
        self.rss: list[int | None] = [None] * len(self.pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sidp-pss-sampler", daemon=True)

    def __enter__(self) -> PeakPss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.rss = [peak_rss_bytes(pid) for pid in self.pids]

    def _run(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            started = time.monotonic()
            self._sample()
            wait = max(self.interval_s, COST_RATIO * (time.monotonic() - started))

    def _sample(self) -> None:
        for i, pid in enumerate(self.pids):
            now = pss_bytes(pid)
            if now is not None and (self.pss[i] is None or now > self.pss[i]):
                self.pss[i] = now
