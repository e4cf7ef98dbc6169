"""A SiDP group leaves nothing in /dev/shm, whether its script ends normally or by Ctrl-C mid-run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import new_shm_entries, shm_entries

SCRIPT = """
import sys
from sidp import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(sys.argv[1], dtype="float32", memory_per_replica="64MiB", data_parallel_size=2,
              weight_sharing="sidp", sidp_mode=sys.argv[2], max_num_seqs=2)
    print("ready", flush=True)
    params = SamplingParams(max_tokens=int(sys.argv[3]), ignore_eos=True)
    llm.generate([[5] * 20] * 16, params, use_tqdm=False)
    print("done", flush=True)
"""


def start(tmp_path, model, mode: str, max_tokens: int) -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), str(model), mode, str(max_tokens)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


@pytest.mark.parametrize("mode", ["auto", "cas"])
def test_normal_exit_and_ctrl_c_leave_no_segment(tiny_model, tmp_path, mode):
    model = tiny_model("llama")
    before = shm_entries()
    job = start(tmp_path, model, mode, 4)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 0 and out.split() == ["ready", "done"]
    assert not new_shm_entries(before, wait_s=0)

    job = start(tmp_path, model, mode, 900)
    assert job.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # the replicas are mid-run
    job.send_signal(signal.SIGINT)
    started = time.monotonic()
    job.wait(timeout=30)
    assert time.monotonic() - started < 15
    assert job.returncode != 0 and "done" not in job.stdout.read()
    assert not new_shm_entries(before)
