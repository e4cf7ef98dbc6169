"""The models the planner knows by name (the SiDP paper's three), or any local config.json."""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources
from pathlib import Path

from sidp.errors import SidpError
from sidp.model.spec import ModelSpec

BUILT_IN = {"qwen3-32b": "Qwen3-32B", "qwen2.5-72b": "Qwen2.5-72B", "llama-3.1-70b": "Llama-3.1-70B"}


def model_spec(name_or_path: str) -> tuple[str, ModelSpec]:
    """(display name, spec) of a built-in model name or a config.json (or the folder holding one)."""
    key = name_or_path.lower()
    if key in BUILT_IN:
        text = resources.files("sidp").joinpath(f"data/plan/{key}.json").read_text(encoding="utf-8")
        return BUILT_IN[key], ModelSpec.from_hf_config(json.loads(text))
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SidpError(
            f"{name_or_path!r} is neither a built-in model ({', '.join(BUILT_IN)}) nor a config.json."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SidpError(f"{path} is not valid JSON: {error}.") from None
    return path.parent.name or str(path), ModelSpec.from_hf_config(config)


def tensor_shard(spec: ModelSpec, tp: int) -> ModelSpec:
    """What one GPU of a tensor-parallel group holds, as a spec: heads, MLP columns and vocabulary split
    tp ways (KV heads replicated where there are fewer than tp); hidden size and norms whole."""
    if (
        spec.num_heads % tp
        or spec.intermediate_size % tp
        or (spec.num_kv_heads % tp and tp % spec.num_kv_heads)
    ):
        raise SidpError(f"Tensor parallelism {tp} does not divide this model's heads and MLP evenly.")
    return replace(
        spec,
        num_heads=spec.num_heads // tp,
        num_kv_heads=max(1, spec.num_kv_heads // tp),
        intermediate_size=spec.intermediate_size // tp,
        vocab_size=-(-spec.vocab_size // tp),
    )
