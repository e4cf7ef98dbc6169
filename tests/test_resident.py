"""The bench's record of what a process held: the peak of its PSS, sampled, and its VmHWM."""

from __future__ import annotations

import subprocess
import sys
import time

from sidp.bench.resident import PeakPss, pss_bytes

SLACK = 4 * 2**20  # what a Python process's PSS moves by between two reads, at most
# Touches 200 MiB, says so, frees it, says so, then waits for its stdin to close.
CHILD = """
import sys
block = bytearray(200 * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("holding", flush=True)
sys.stdin.readline()
del block
print("freed", flush=True)
sys.stdin.read()
"""


def test_the_peak_outlasts_the_memory_it_measured():
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        with PeakPss([child.pid], interval_s=0.02) as peaks:
            assert child.stdout.readline() == "holding\n"
            holding = pss_bytes(child.pid)
            deadline = time.monotonic() + 10
            while (peaks.pss[0] or 0) < holding - SLACK and time.monotonic() < deadline:
                time.sleep(0.01)  # until the sampler has read it, however long its reads take here
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline() == "freed\n"
        freed = pss_bytes(child.pid)
    finally:
        child.stdin.close()
        child.wait()
    assert holding > freed + 150 * 2**20
    assert peaks.pss[0] >= holding - SLACK  # kept after the memory was freed
    assert peaks.rss[0] >= peaks.pss[0]


def test_a_process_that_has_gone_reads_as_none():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with PeakPss([child.pid]) as peaks:
        pass
    assert peaks.pss == [None] and peaks.rss == [None]
