"""The docs' figures come from the JSONs runs wrote: every generated table in README.md and docs/*.md is
what its kind renders from its JSONs today, and every figure in the prose is one that a table of its
section shows or a JSON the section names holds (sidp/bench/doc_tables.py, sidp/bench/doc_figures.py)."""

from __future__ import annotations

import json

import pytest

from sidp.bench.doc_figures import figures, unsourced
from sidp.bench.doc_tables import DOCS, ROOT, DocError, blocks, main, rewrite, stale


@pytest.mark.parametrize("doc", DOCS)
def test_every_generated_table_is_what_its_jsons_render(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    assert blocks(text), f"{doc} has no generated table"
    assert stale(text, name=doc) == [], "run: python -m sidp.bench.doc_tables --write"


@pytest.mark.parametrize("doc", DOCS)
def test_every_prose_figure_has_a_source(doc):
    assert unsourced((ROOT / doc).read_text(encoding="utf-8"), name=doc) == []


# --- the check itself, on a small doc of its own ----------------------------------------------------


def run_json(output_tokens_per_s: float) -> dict:
    return {
        "command": "sidp bench --baseline none --out docs/bench/run.json",
        "timestamp": "2026-12-02T00:14:37+00:00",
        "workload": {"prompt_tokens": 16186, "output_tokens": 10386},
        "results": [{"engine": "sidp", "label": "sidp", "output_tokens_per_s": output_tokens_per_s}],
        "machine": {
            "cpu": "Some CPU",
            "cpu_flags": {"avx2": True, "amx_bf16": False},
            "cores": 2,
            "torch": "2.13.0+cpu",
        },
        "share": 0.125,
    }


@pytest.fixture
def root(tmp_path):
    (tmp_path / "docs/bench").mkdir(parents=True)
    (tmp_path / "docs/bench/run.json").write_text(json.dumps(run_json(415.6)))
    return tmp_path


DOC = """# Doc

## A run

<!-- table runs docs/bench/run.json -->
<!-- end table -->

{prose}

## Another section

{other}
"""


def doc(root, prose: str = "", other: str = "") -> str:
    return rewrite(DOC.format(prose=prose, other=other), root)


def test_a_block_renders_command_table_machine_and_date(root):
    body = blocks(doc(root))[0].body
    assert "sidp bench --baseline none --out docs/bench/run.json" in body
    assert "| `run.json` | 2026-12-02 00:14 | 415.60 |" in body
    assert "Ran on Some CPU (avx2, no amx_bf16), 2 cores, torch 2.13.0+cpu; 2026-12-02 00:14 UTC." in body


def test_a_doctored_number_in_a_block_is_stale(root):
    text = doc(root)
    assert stale(text, root) == []
    assert stale(text.replace("415.60", "415.61"), root, name="X.md") == [
        "X.md:5: table runs docs/bench/run.json is stale"
    ]


def test_a_rerun_that_changes_the_json_makes_its_block_stale(root):
    text = doc(root)
    (root / "docs/bench/run.json").write_text(json.dumps(run_json(420.0)))
    assert len(stale(text, root)) == 1
    assert "420.00" in rewrite(text, root)


@pytest.mark.parametrize(
    "prose",
    [
        "sidp ran 415.60 output tok/s",  # a cell of the section's table
        "about 415.6 tok/s",  # a JSON value, rounded as written
        "16,186 prompt tokens",  # a comma-grouped JSON value
        "12.5% of it",  # a JSON value times 100
        "`sidp bench --scale 0.125` and Llama-3.1-70B on torch 2.13.0, 64 requests on 2 cores",  # not figures
    ],
)
def test_prose_figures_backed_by_the_section_pass(root, prose):
    assert unsourced(doc(root, prose), root) == []


@pytest.mark.parametrize("prose", ["sidp ran 415.61 tok/s", "1.5x faster", "16,187 tokens", "13% of it"])
def test_a_prose_figure_the_json_does_not_hold_is_reported(root, prose):
    text = doc(root, prose)
    (problem,) = unsourced(text, root, name="X.md")
    line = text.split("\n").index(prose) + 1
    assert problem.startswith(f"X.md:{line}: ") and "is in no table of its section (## A run)" in problem


def test_a_figure_is_backed_only_within_its_own_section(root):
    (problem,) = unsourced(doc(root, other="sidp ran 415.60 tok/s"), root)
    assert "415.60 is in no table of its section (## Another section)" in problem
    assert unsourced(doc(root, other="sidp ran 415.60 tok/s (`docs/bench/run.json`)"), root) == []


def test_what_counts_as_a_figure():
    text = "0.4-0.5 ms, -22%, 1.2×, 2x, 16,186, 3.3 s; not 64, 2.13.0, Qwen2.5-72B, Llama-3.1, x86"
    assert [w for w, _, _ in figures(text)] == ["0.4", "0.5", "-22%", "1.2×", "2x", "16,186", "3.3"]


def test_a_machines_home_folder_never_reaches_a_doc(root):
    data = run_json(415.6)
    data["command"] = "sidp bench --model /home/someone/models/x --out docs/bench/run.json"
    (root / "docs/bench/run.json").write_text(json.dumps(data))
    assert "--model ~/models/x" in doc(root)
    assert unsourced("see /home/someone/x", root) == ["doc:1: a machine's home folder"]


def test_bad_markers_say_what_is_wrong(root):
    with pytest.raises(DocError, match="unknown table kind 'nope'"):
        rewrite("<!-- table nope docs/bench/run.json -->\n<!-- end table -->", root)
    with pytest.raises(DocError, match="missing.json"):
        rewrite("<!-- table runs docs/bench/missing.json -->\n<!-- end table -->", root)
    with pytest.raises(DocError, match="without"):
        blocks("<!-- table runs docs/bench/run.json -->\n")
    with pytest.raises(DocError, match="table memory docs/bench/run.json: KeyError"):
        rewrite("<!-- table memory docs/bench/run.json -->\n<!-- end table -->", root)


def test_the_command_line_checks_then_writes(tmp_path, capsys):
    path = tmp_path / "doc.md"
    path.write_text("## PSS\n\n<!-- table memory docs/bench/pss-dp2-540mib.json -->\n<!-- end table -->\n")
    assert main(["--check", str(path)]) == 1
    assert "is stale" in capsys.readouterr().out
    assert main(["--write", str(path)]) == 0
    assert main(["--check", str(path)]) == 0
