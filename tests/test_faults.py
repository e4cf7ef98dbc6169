"""Every fault of tests/fault_cases.py, once: the group stops in time and leaves nothing behind.

(benchmarks/fault_soak.py runs each case many times and records how long the group took to stop.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_cases import CASES, run_case


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.mark.parametrize("case", list(CASES))
def test_the_group_stops_and_leaves_nothing(case, model, tmp_path):
    outcome = run_case(case, tmp_path, model)
    assert outcome.left == [], f"{outcome}"


def test_every_case_of_today_was_soaked():
    """docs/RELIABILITY.md's soak table is rendered from this JSON (tests/test_docs_figures.py holds the
    table to it); a case added since the soak fails here until the soak runs again."""
    soak = Path(__file__).resolve().parent.parent / "docs/reliability/fault-soak.json"
    assert [c["case"] for c in json.loads(soak.read_text())["cases"]] == list(CASES)
