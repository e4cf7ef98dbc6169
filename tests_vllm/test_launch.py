"""`python -m sidp.vllm_plugin.launch`: each rank is told who it is and gets CPUs of its own; one rank's
failure stops the others."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from sidp.vllm_plugin import launch, settings

WRITE_ENV = (
    "import json, os, sys; keys = ('SIDP_VLLM_GROUP', 'SIDP_VLLM_RANK', 'SIDP_VLLM_SIZE', "
    "'VLLM_CPU_OMP_THREADS_BIND'); r = os.environ['SIDP_VLLM_RANK']; "
    "json.dump({k: os.environ.get(k) for k in keys}, open(os.path.join(sys.argv[1], r + '.json'), 'w'))"
)


def _seen(folder, size: int) -> list[dict]:
    return [json.loads((folder / f"{rank}.json").read_text()) for rank in range(size)]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_each_rank_knows_its_rank_and_group_and_has_its_own_cpus(tmp_path):
    assert launch.launch([sys.executable, "-c", WRITE_ENV, str(tmp_path)], 2) == 0
    seen = _seen(tmp_path, 2)
    assert [s[settings.RANK] for s in seen] == ["0", "1"]
    assert {s[settings.SIZE] for s in seen} == {"2"}
    assert seen[0][settings.GROUP] == seen[1][settings.GROUP] and seen[0][settings.GROUP].startswith("sidp-")
    cpus = [set(map(int, s["VLLM_CPU_OMP_THREADS_BIND"].split(","))) for s in seen]
    assert not cpus[0] & cpus[1] and cpus[0] | cpus[1] == os.sched_getaffinity(0)


def test_without_sidp_the_ranks_get_no_group(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.GROUP, "inherited")
    assert launch.launch([sys.executable, "-c", WRITE_ENV, str(tmp_path)], 2, sidp=False, bind=False) == 0
    assert [s[settings.GROUP] for s in _seen(tmp_path, 2)] == [None, None]


def test_a_failing_rank_stops_the_others():
    code = "import os, sys, time; sys.exit(3) if os.environ['SIDP_VLLM_RANK'] == '1' else time.sleep(120)"
    started = time.monotonic()
    assert launch.launch([sys.executable, "-c", code], 2, bind=False) == 3
    assert time.monotonic() - started < 30  # rank 0 was stopped, not waited for
