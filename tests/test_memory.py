"""The memory ledger is exact: the weights it counts are the bytes the decoder holds, KV is the rest."""

from __future__ import annotations

import pytest
import torch

from sidp import LLM


def held_weight_bytes(model) -> int:
    tensors = {id(t): t for t in (model.embed, model.lm_head, model.norm)}
    for layer in model.layers:
        parts = [*vars(layer).values(), *layer.local.values()]
        tensors.update({id(t): t for t in parts if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_ledger_counts_the_weights_held_and_gives_the_rest_to_kv(tiny_model, family, tied, dtype):
    llm = LLM(tiny_model(family, tied), dtype=dtype, memory_per_replica="32MiB")
    plan, runner = llm.engine.plan, llm.engine.runner
    assert plan.weight_total == held_weight_bytes(runner.model)
    kv_held = sum(c.k.nbytes + c.v.nbytes for c in runner.kv_caches)
    assert kv_held == plan.kv_bytes
    assert 0 <= plan.budget - plan.weight_total - plan.workspace - plan.kv_bytes < plan.block_bytes
    assert plan.kv_tokens == plan.num_blocks * 16


def test_start_up_prints_vllm_lines(tiny_model, capfd):
    llm = LLM(tiny_model("llama"), dtype="float32", memory_per_replica="32MiB", max_model_len=512)
    text = capfd.readouterr().err
    assert f"KV cache size: {llm.engine.plan.kv_tokens:,} tokens" in text
    assert f"Maximum concurrency for 512 tokens per request: {llm.engine.plan.kv_tokens / 512:.2f}x" in text
