"""EngineArgs: one set of defaults for LLM(...) and the command line, and resolve()'s immutable group plan."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import over_runtime

from sidp import LLM, SidpError
from sidp.cli import build_parser
from sidp.engine_args import EngineArgs, engine_args_from
from sidp.model.checkpoint import read_config
from sidp.model.spec import ModelSpec


def test_the_command_line_defaults_are_engine_args_defaults():
    """`sidp generate` with no flags describes EngineArgs() (bar what generate picks per machine)."""
    args = build_parser().parse_args(["generate", "--dp", "1"])
    assert engine_args_from(args) == EngineArgs()
    bench = build_parser().parse_args(["bench"])
    assert engine_args_from(bench) == EngineArgs(dtype="bfloat16")
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    missing = {f.name for f in dataclasses.fields(EngineArgs)} - flags - {"data_parallel_size"}
    assert missing == {"block_size", "mode_probe_every", "replica_process"}  # bench sets the last two


def test_resolve_gives_one_immutable_plan_with_every_replicas_ledger(tiny_model):
    path = tiny_model("qwen3")
    config = read_config(path)
    spec = ModelSpec.from_hf_config(config)
    args = EngineArgs(
        model=path,
        dtype="float32",
        device="cpu",
        memory_per_replica=over_runtime("64MiB"),
        data_parallel_size=3,
        weight_sharing="sidp",
        sidp_mode="map",
        pooled_parts="mlp,attn",
    )
    plan = args.resolve(spec, config)
    assert plan.size == 3 and plan.pooled and plan.config.device == "cpu"
    assert plan.config.sidp_mode == "map" and plan.config.pooled_parts == {"mlp", "attn"}
    assert [p.budget for p in plan.plans] == [int(over_runtime("64MiB"))] * 3
    assert all(p.kv_tokens > plan.plain.kv_tokens for p in plan.plans)  # SiDP holds more KV than DP
    assert plan.config.max_model_len == min(spec.max_position_embeddings, plan.tightest.kv_tokens)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.config = None
    plain = dataclasses.replace(args, weight_sharing="none").resolve(spec, config)
    assert plain.size == 3 and not plain.pooled and plain.plans == (plan.plain,) * 3


def test_bad_arguments_and_a_missing_gpu_fail_in_one_sentence(tiny_model):
    path = Path(tiny_model("llama"))
    with pytest.raises(SidpError, match="unknown argument.*gpu_count"):
        LLM(path, gpu_count=2)
    with pytest.raises(SidpError, match="device must be one of cpu, cuda"):
        LLM(path, device="tpu")
    with pytest.raises(SidpError, match="gpu_memory_utilization must be in"):
        LLM(path, gpu_memory_utilization=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(SidpError, match="torch sees no GPU"):
            LLM(path, device="cuda")
