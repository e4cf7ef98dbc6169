"""The plugin inside vLLM: two ranks with it generate what vLLM alone generates (greedy, float32), each
owns the layers sidp's placement gives it and borrows the others from their owner's memory, freeing their
bytes; installed but not switched on, it changes nothing.

Each vLLM start takes tens of seconds here, so every model runs once per setting (module fixtures), at
most two vLLM processes at a time, each on a core of its own, without torch.compile in either run.
"""

from __future__ import annotations

import json

import pytest

from sidp.memory import format_bytes
from tests_vllm.conftest import rank_command, run_stage, write_prompts

SMOLLM2_PROMPTS = [  # token ids of a few English and code prompts
    [504, 3575, 282, 4649, 314],
    [19161, 253, 421, 30614, 563, 260, 3426, 30],
    [1604, 3987, 46477, 24, 94, 727],
    [6403, 1980, 253, 655],
]
QWEN3_PROMPTS = [[5, 17, 99, 3, 42, 200], [1, 64, 65, 66], [250, 7, 7, 7, 7, 7, 13], [31]]
MAX_TOKENS = 24


def launch(size: int, command: list[str]) -> list[str]:
    return [command[0], "-m", "sidp.vllm_plugin.launch", "--ranks", str(size), "--", *command]


@pytest.fixture(scope="module")
def smollm2_runs(smollm2, tmp_path_factory):
    """SmolLM2 through vLLM alone, with the plugin installed but off, and as a SiDP group of two."""
    folder = tmp_path_factory.mktemp("smollm2")
    prompts = write_prompts(folder, SMOLLM2_PROMPTS)
    dirs = {name: folder / name for name in ("alone", "off", "pooled")}
    for d in dirs.values():
        d.mkdir()
    commands = {name: rank_command(smollm2, prompts, d, MAX_TOKENS) for name, d in dirs.items()}
    runs = run_stage(
        {
            "vLLM alone": (
                commands["alone"],
                {"VLLM_PLUGINS": "", "VLLM_CPU_OMP_THREADS_BIND": "0"},
                dirs["alone"],
            ),
            "plugin off": (commands["off"], {"VLLM_CPU_OMP_THREADS_BIND": "1"}, dirs["off"]),
        }
    )
    runs |= run_stage({"pooled": (launch(2, commands["pooled"]), {}, dirs["pooled"])})
    return runs


@pytest.fixture(scope="module")
def qwen3_runs(tiny_qwen3, tmp_path_factory):
    """A tiny random Qwen3 through vLLM alone and as a SiDP group of two pooling MLPs and attention."""
    folder = tmp_path_factory.mktemp("qwen3-runs")
    prompts = write_prompts(folder, QWEN3_PROMPTS)
    alone, pooled = folder / "alone", folder / "pooled"
    alone.mkdir()
    pooled.mkdir()
    runs = run_stage(
        {
            "vLLM alone": (
                rank_command(tiny_qwen3, prompts, alone, MAX_TOKENS),
                {"VLLM_PLUGINS": "", "VLLM_CPU_OMP_THREADS_BIND": "0"},
                alone,
            )
        }
    )
    command = launch(2, rank_command(tiny_qwen3, prompts, pooled, MAX_TOKENS))
    runs |= run_stage({"pooled": (command, {"SIDP_VLLM_POOLED_PARTS": "mlp,attn"}, pooled)})
    return runs


def test_two_ranks_generate_what_vllm_alone_does(smollm2_runs, qwen3_runs):
    for runs in (smollm2_runs, qwen3_runs):
        (alone,) = runs["vLLM alone"].results
        ranks = runs["pooled"].results
        assert len(ranks) == 2
        for rank in ranks:
            assert rank["tokens"] == alone["tokens"]
            assert all(len(t) == MAX_TOKENS for t in rank["tokens"])


@pytest.mark.parametrize(
    ("model", "runs", "parts"),
    [("smollm2", "smollm2_runs", ("mlp",)), ("tiny_qwen3", "qwen3_runs", ("attn", "mlp"))],
    ids=["smollm2", "qwen3"],
)
def test_each_rank_owns_its_layers_and_frees_the_others(model, runs, parts, request):
    config = json.loads((request.getfixturevalue(model) / "config.json").read_text())
    pooled = request.getfixturevalue(runs)["pooled"]
    layers = config["num_hidden_layers"]
    per_layer = _pooled_bytes(config, parts)
    for rank, result in enumerate(pooled.results):
        summary = result["worker"]["summary"]
        assert summary["rank"] == rank and summary["size"] == 2
        # vLLM keys its compiled code by the config: the pooled graph must not load in place of its own
        assert result["worker"]["additional_config"] == {"sidp": {"pooled_parts": list(parts)}}
        assert summary["parts"] == list(parts)
        assert summary["owners"] == [layer % 2 for layer in range(layers)]  # round robin, sidp's default
        assert summary["owned"] == list(range(rank, layers, 2))
        assert summary["pooled_bytes"] == layers * per_layer
        assert summary["freed_bytes"] == (layers - len(summary["owned"])) * per_layer
        owned = ", ".join(map(str, summary["owned"]))
        assert f"sidp: rank {rank} of 2 owns the {','.join(parts)} of layers {owned} " in pooled.log
    freed = format_bytes(summary["freed_bytes"])
    assert pooled.log.count(f"sidp: freed {freed} of this rank's weights") == 2


def test_both_ranks_compute_on_the_same_memory(smollm2_runs, qwen3_runs):
    """Every layer's MLP weight lives in one shared segment, its owner's, which both ranks map."""
    for runs in (smollm2_runs, qwen3_runs):
        first, second = (r["worker"]["mlp_segments"] for r in runs["pooled"].results)
        assert first == second
        assert None not in first and len(set(first)) == len(first)
        (alone,) = runs["vLLM alone"].results
        assert set(alone["worker"]["mlp_segments"]) == {None}  # vLLM's own weights: private memory


def test_installed_but_off_changes_nothing(smollm2_runs):
    (alone,) = smollm2_runs["vLLM alone"].results
    (off,) = smollm2_runs["plugin off"].results
    assert off["tokens"] == alone["tokens"]
    for result in (alone, off):
        worker = result["worker"]
        assert worker["offloader"] == "NoopOffloader" and worker["summary"] is None
        assert worker["plain_linears"] == [] and not worker["load_model_wrapped"]
    assert "sidp:" not in smollm2_runs["plugin off"].log


def _pooled_bytes(config: dict, parts: tuple[str, ...]) -> int:
    """One layer's pooled float32 bytes, from the Hugging Face config."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    sizes = {"mlp": 3 * hidden * inter, "attn": (q + 2 * kv) * hidden + hidden * q}
    return 4 * sum(sizes[part] for part in parts)
