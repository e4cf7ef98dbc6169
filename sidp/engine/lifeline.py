"""A replica's tie to its driver: it dies with the driver, whatever the driver died of and whatever the
replica is doing (loading, waiting, computing, serving CaS, prefetching WaS).

Two ways, because each misses a case: on Linux the kernel kills the replica the moment the driver's
thread that started it exits (PR_SET_PDEATHSIG, which acts at once even mid-matmul); everywhere, a
watchdog thread checks the parent pid every CHECK_S (which also covers a driver that died before the
replica set its death signal, while it was still importing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

CHECK_S = 0.5
PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1


def tie_to_driver(driver_pid: int, name: str, kernel_signal: bool) -> None:
    """Exit as soon as the driver `driver_pid` is gone. kernel_signal: also ask Linux for a death
    signal (only when the driver started the replicas from its main thread, which lives as long as the
    driver: the kernel ties the signal to the starting thread, not to the process)."""
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)  # what `ps -o comm` and `top` show
        if kernel_signal:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != driver_pid:  # the driver died before the signal was set
        os._exit(0)
    threading.Thread(target=_watch, args=(driver_pid,), name="sidp-lifeline", daemon=True).start()


def _watch(driver_pid: int) -> None:
    event = threading.Event()
    while not event.wait(CHECK_S):
        if os.getppid() != driver_pid:  # reparented: the driver has gone
            os._exit(0)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
