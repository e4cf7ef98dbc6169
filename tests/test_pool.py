"""Placement gives every layer one owner; the ledger turns exactly the bytes SiDP saves into KV cache."""

from __future__ import annotations

import pytest
import torch

from sidp import SidpError
from sidp.memory import layer_weight_bytes, plan_memory
from sidp.model.spec import ModelSpec
from sidp.pool.placement import Placement

SMOLLM2 = ModelSpec.from_hf_config(
    dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    )
)


@pytest.mark.parametrize("policy", ["round_robin", "contiguous"])
@pytest.mark.parametrize(("layers", "size"), [(30, 2), (30, 4), (3, 3), (7, 3), (2, 3)])
def test_every_layer_has_one_owner_and_loads_are_even(policy, layers, size):
    placement = Placement.build(layers, size, policy)
    owned = [placement.owned_by(rank) for rank in range(size)]
    assert sorted(layer for part in owned for layer in part) == list(range(layers))
    assert max(map(len, owned)) - min(map(len, owned)) <= 1
    for rank in range(size):
        assert sorted(placement.owned_by(rank) + placement.remote_for(rank)) == list(range(layers))


def test_placement_shapes():
    assert Placement.build(5, 2, "round_robin").owners == (0, 1, 0, 1, 0)
    assert Placement.build(5, 2, "contiguous").owners == (0, 0, 0, 1, 1)
    with pytest.raises(SidpError, match="round_robin"):
        Placement.build(5, 2, "random")


@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("size", [2, 3, 4])
def test_kv_gained_equals_bytes_saved_minus_slots(size, slots):
    budget = 600 * 2**20
    args = (SMOLLM2, torch.bfloat16, budget, 16, 2048, 256)
    dp = plan_memory(*args)
    mlp = layer_weight_bytes(SMOLLM2, 2)["mlp"]
    for rank in range(size):
        owned = len(Placement.build(30, size).owned_by(rank))
        sidp = plan_memory(*args, mlp_layers=owned, cache_slots=slots)
        free_dp = dp.budget - dp.weight_total - dp.workspace
        free_sidp = sidp.budget - sidp.weight_total - sidp.workspace
        assert free_sidp - free_dp == (30 - owned - slots) * mlp
        assert sidp.weights["mlp cache slots"] == slots * mlp


def test_sidp_capacity_at_twice_the_weights():
    """The issue's capacity figure: budget = 2x the bf16 weights, N=2, MLPs pooled, 2 slots."""
    weights = plan_memory(SMOLLM2, torch.bfloat16, 2**40, 16, 2048, 256).weight_total
    dp = plan_memory(SMOLLM2, torch.bfloat16, 2 * weights, 16, 2048, 256)
    sidp = plan_memory(SMOLLM2, torch.bfloat16, 2 * weights, 16, 2048, 256, mlp_layers=15, cache_slots=2)
    assert sidp.kv_tokens / dp.kv_tokens >= 1.25


def test_start_up_table_sets_sidp_beside_plain_dp():
    args = (SMOLLM2, torch.bfloat16, 600 * 2**20, 16, 2048, 256)
    dp, sidp = plan_memory(*args), plan_memory(*args, mlp_layers=15, cache_slots=2)
    text = sidp.report(8192, dp)
    assert f"KV cache size: {sidp.kv_tokens:,} tokens" in text
    assert f"({sidp.kv_tokens / dp.kv_tokens:.2f}x KV)" in text
    kv_row = next(line for line in text.splitlines() if line.strip().startswith("KV tokens"))
    assert kv_row.split()[-2:] == [f"{dp.kv_tokens:,}", f"{sidp.kv_tokens:,}"]
