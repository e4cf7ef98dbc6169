"""Every fault of tests/fault_cases.py, once: the group stops in time and leaves nothing behind.

(benchmarks/fault_soak.py runs each case many times and records how long the group took to stop.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_cases import CASES, run_case, with_table


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.mark.parametrize("case", list(CASES))
def test_the_group_stops_and_leaves_nothing(case, model, tmp_path):
    outcome = run_case(case, tmp_path, model)
    assert outcome.left == [], f"{outcome}"


def test_the_reliability_doc_shows_what_its_soak_json_holds():
    """docs/RELIABILITY.md's table is the one benchmarks/fault_soak.py renders from its JSON, case for
    case and figure for figure: a soak re-run without its doc (or a hand edit) fails here."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    report = json.loads((docs / "reliability/fault-soak.json").read_text())
    doc = (docs / "RELIABILITY.md").read_text()
    assert doc == with_table(doc, report)
    assert [c["case"] for c in report["cases"]] == list(CASES)  # every case of today's list was soaked
