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


# --- the kinds of `sidp plan --paper`, on a small comparison of their own ------------------------------


def plan_run(tok_s: float, was: int = 0, cas: int = 0, group: tuple | None = None) -> dict:
    run = {"output_tokens_per_s": tok_s, "steps": was + cas, "preemptions": 0, "steps_by_mode": {}}
    if was or cas:
        run["steps_by_mode"] = {"was": was, "cas": cas}
    if group:
        run["group"] = dict(zip(("cas_passes", "requests_per_pass", "serving_share"), group, strict=True))
    return run


def paper_json() -> dict:
    fits = {
        "model": "Qwen3-32B",
        "dp": 8,
        "tp": 1,
        "capacity": {
            "dp": {"fits": True, "kv_tokens_per_replica": 252064, "kv_tokens_per_node": 2016512},
            "sidp": {"fits": True, "kv_tokens_per_replica": 412592, "kv_tokens_per_node": 3300736},
        },
        "1K": {
            "dp": plan_run(12233.4),
            "sidp_replica": plan_run(11687.3, cas=3064),
            "sidp_group": plan_run(7826.3, cas=3064, group=(171261, 1.0, 0.3957)),
            "replica_vs_dp": 0.955,
            "group_vs_dp": 0.64,
        },
        "4K": {
            "dp": plan_run(3253.5),
            "sidp_replica": plan_run(3420.6, 1056, 3296),
            "sidp_group": plan_run(2992.8, 889, 3463, (193740, 1.0, 0.1273)),
            "sidp_group_fixed_policy": plan_run(3213.8, 1056, 3296, (184413, 1.0, 0.0579)),
            "replica_vs_dp": 1.051,
            "group_vs_dp": 0.92,
            "group_fixed_policy_vs_dp": 0.988,
        },
        "4K_small_batch": [
            {"half_speed_rows": 64, "replica_vs_dp": 1.281, "group_vs_dp": 1.105},
            {"half_speed_rows": 256, "replica_vs_dp": 1.596, "group_vs_dp": 1.339},
        ],
    }
    unfit = {
        "model": "Qwen2.5-72B",
        "dp": 8,
        "tp": 1,
        "capacity": {
            "dp": {"fits": False, "kv_tokens_per_replica": 0, "kv_tokens_per_node": 0},
            "sidp": {"fits": True, "kv_tokens_per_replica": 256272, "kv_tokens_per_node": 2050176},
        },
        "1K": {
            "sidp_replica": plan_run(5592.0, cas=10),
            "sidp_group": plan_run(3628.0, cas=10, group=(10, 1.0, 0.4)),
            "replica_vs_dp": None,
            "group_vs_dp": None,
        },
        "4K": {
            "sidp_replica": plan_run(1545.0, 5, 10),
            "sidp_group": plan_run(1289.0, 5, 10, (10, 1.0, 0.2)),
            "sidp_group_fixed_policy": plan_run(1417.0, 5, 10, (10, 1.0, 0.1)),
            "replica_vs_dp": None,
            "group_vs_dp": None,
            "group_fixed_policy_vs_dp": None,
        },
    }
    device = {
        "name": "H200",
        "memory_bytes": 136_258_978_611,
        "flops": 593.4e12,
        "mem_bw": 3.84e12,
        "link_bw": 315e9,
        "round_trip_s": 20e-6,
        "layer_overhead_s": 10e-6,
    }
    return {
        "command": "sidp plan --gpu H200 --paper --json docs/plan/paper.json",
        "device": device,
        "paper": {
            "gpu": "H200",
            "half_speed_rows": [64, 256],
            "results": [fits, unfit],
            "rows": [
                {"figure": "KV capacity over DP at TP=1/DP=8", "paper": "up to 1.8x", "ours": "1.64x"},
                {"figure": "throughput over DP, 4K inputs", "paper": "up to 1.5x", "ours": "0.92x"},
                {"figure": "4K inputs, kernels at half speed", "paper": "up to 1.5x", "ours": "1.34x"},
            ],
        },
    }


@pytest.mark.parametrize(
    ("kind", "row", "doctored"),
    [
        (
            "plan-paper",
            "| H200 | Qwen3-32B | 8 | 1 | 252,064 | 412,592 | 1.64x | 12,233 | 11,687 (0.95x) "
            "| 7,826 (0.64x) | 3,254 | 3,421 (1.05x) | 2,993 (0.92x) | 3,214 (0.99x) |",
            ("2,993 (0.92x)", "2,993 (0.93x)"),
        ),
        (
            "plan-paper-group",
            "| H200 | Qwen3-32B | 8 | 1 | 171,261 | 1.00 | 39.6% | 193,740 | 1.00 | 12.7% | 5.8% | 889/3,463 "
            "| 1,056/3,296 | 1,056/3,296 |",
            ("| 12.7% |", "| 12.8% |"),
        ),
        (
            "plan-paper-small-batch",
            "| H200 | Qwen3-32B | 8 | 1 | 1.05x | 0.92x | 1.28x | 1.10x | 1.60x | 1.34x | H=256 |",
            ("1.34x | H=256", "1.34x | H=64"),
        ),
    ],
)
def test_a_paper_kind_renders_its_rows_and_a_doctored_value_is_stale(tmp_path, kind, row, doctored):
    (tmp_path / "docs/plan").mkdir(parents=True)
    (tmp_path / "docs/plan/paper.json").write_text(json.dumps(paper_json()))
    text = rewrite(f"## Paper\n\n<!-- table {kind} docs/plan/paper.json -->\n<!-- end table -->\n", tmp_path)
    assert "sidp plan --gpu H200 --paper --json docs/plan/paper.json" in text
    assert row in text.split("\n")
    assert stale(text, tmp_path) == []
    assert stale(text.replace(*doctored), tmp_path, "X.md") == [
        f"X.md:3: table {kind} docs/plan/paper.json is stale"
    ]


def test_paper_kinds_say_where_plain_dp_does_not_fit(tmp_path):
    (tmp_path / "docs/plan").mkdir(parents=True)
    (tmp_path / "docs/plan/paper.json").write_text(json.dumps(paper_json()))
    lines = rewrite(
        "<!-- table plan-paper docs/plan/paper.json -->\n<!-- end table -->\n"
        "<!-- table plan-paper-small-batch docs/plan/paper.json -->\n<!-- end table -->\n",
        tmp_path,
    ).split("\n")
    unfit = (
        "| H200 | Qwen2.5-72B | 8 | 1 | does not fit | 256,272 | - | - | 5,592 | 3,628 | - | 1,545 | 1,289 |"
    )
    assert f"{unfit} 1,417 |" in lines
    assert "No ratio where plain DP does not fit: Qwen2.5-72B DP=8/TP=1 on H200." in lines
    assert (  # each of the paper's figures once
        "The paper's published figures: KV capacity over DP at TP=1/DP=8: up to 1.8x; "
        "throughput over DP, 4K inputs: up to 1.5x." in lines
    )
