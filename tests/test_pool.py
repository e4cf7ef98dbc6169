"""Placement gives every layer one owner; the ledger turns exactly the bytes SiDP saves into KV cache."""

from __future__ import annotations

import time

import pytest
import torch

from sidp import SidpError
from sidp.memory import TIED_HEAD_COPY, layer_weight_bytes, plan_memory, weight_bytes
from sidp.model.spec import ModelSpec
from sidp.pool.cas import cas_buffer_bytes
from sidp.pool.placement import Placement, parse_parts, pool_share
from sidp.pool.weight_cache import WeightCache

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
    assert Placement.build(5, 2).embed_owner == 1  # the rank with fewer layers takes the embedding
    assert Placement.build(30, 4).embed_owner == 3
    assert Placement.build(4, 2).embed_owner == 1
    with pytest.raises(SidpError, match="round_robin"):
        Placement.build(5, 2, "random")
    assert parse_parts(" attn, mlp ") == {"attn", "mlp"}
    with pytest.raises(SidpError, match="mlp, attn, embed"):
        parse_parts("mlp,lm_head")


@pytest.mark.parametrize("mode", ["was", "cas", "auto", "map"])
@pytest.mark.parametrize("parts", ["mlp", "mlp,attn", "mlp,attn,embed", "attn"])
@pytest.mark.parametrize(("size", "slots"), [(2, 2), (3, 1), (4, 3)])
def test_kv_gained_equals_bytes_saved_minus_pool_buffers(size, slots, parts, mode):
    """SiDP KV bytes = DP KV bytes + bytes DP replicates that this replica no longer holds
    - WaS cache slots - CaS buffers, exactly, for every replica."""
    args = (SMOLLM2, torch.bfloat16, 900 * 2**20, 16, 2048, 256)
    dp = plan_memory(*args)
    pooled = parse_parts(parts)
    per_layer = layer_weight_bytes(SMOLLM2, 2)
    piece = per_layer["mlp"] * ("mlp" in pooled) + per_layer["attention"] * ("attn" in pooled)
    placement = Placement.build(30, size)
    for rank in range(size):
        share = pool_share(placement, rank, pooled, mode, slots)
        sidp = plan_memory(*args, share=share)
        not_held = (30 - len(placement.owned_by(rank))) * piece
        if "embed" in pooled and placement.embed_owner != rank:
            not_held += SMOLLM2.vocab_size * SMOLLM2.hidden_size * 2
        # A packed copy of the tied head, made where the CPU multiplies bf16 natively and there is room.
        not_held += dp.weights.get(TIED_HEAD_COPY, 0) - sidp.weights.get(TIED_HEAD_COPY, 0)
        slot_bytes = slots * piece if mode in ("was", "auto") else 0
        cas_bytes = cas_buffer_bytes(SMOLLM2, torch.bfloat16, size - 1) if mode in ("cas", "auto") else 0
        assert sidp.weights["pool: WaS cache slots"] == slot_bytes
        assert sidp.weights["pool: CaS buffers"] == cas_bytes
        free_dp = (
            dp.budget - dp.overhead_total - dp.weight_total - dp.workspace
        )  # what KV blocks are cut from
        free_sidp = sidp.budget - sidp.overhead_total - sidp.weight_total - sidp.workspace
        assert free_sidp == free_dp + not_held - slot_bytes - cas_bytes


def _capacity_ratio(size: int, parts: str, mode: str = "auto") -> float:
    weights = sum(weight_bytes(SMOLLM2, 2).values())  # the model's own, without a packed copy of the head
    args = (SMOLLM2, torch.bfloat16, 2 * weights, 16, 2048, 256)
    dp = plan_memory(*args)
    placement = Placement.build(30, size)
    shares = [pool_share(placement, rank, parse_parts(parts), mode, 2) for rank in range(size)]
    return min(plan_memory(*args, share=share).kv_tokens for share in shares) / dp.kv_tokens


def test_sidp_capacity_at_twice_the_weights():
    """The issue's capacity figures (budget = 2x the bf16 weights, 2 slots, the tightest replica)."""
    assert _capacity_ratio(2, "mlp") >= 1.25
    assert _capacity_ratio(4, "mlp,attn,embed") >= 1.7


def test_start_up_table_sets_sidp_beside_plain_dp():
    args = (SMOLLM2, torch.bfloat16, 600 * 2**20, 16, 2048, 256)
    share = pool_share(Placement.build(30, 2), 0, parse_parts("mlp"), "auto", 2)
    dp, sidp = plan_memory(*args), plan_memory(*args, share=share)
    text = sidp.report(8192, dp)
    assert f"KV cache size: {sidp.kv_tokens:,} tokens" in text
    assert f"({sidp.kv_tokens / dp.kv_tokens:.2f}x KV)" in text
    kv_row = next(line for line in text.splitlines() if line.strip().startswith("KV tokens"))
    assert kv_row.split()[-2:] == [f"{dp.kv_tokens:,}", f"{sidp.kv_tokens:,}"]


def test_a_prefetch_thread_that_dies_is_an_error_in_acquire_not_a_hang():
    peers = {layer: {"w": torch.full((4, 4), float(layer))} for layer in (1, 3)}
    copies = []

    def copy_into(slot: torch.Tensor, view: torch.Tensor) -> None:
        if len(copies) == 2:
            raise OSError("the owner's memory is gone")
        copies.append(view)
        slot.copy_(view)

    cache = WeightCache([1, 3], peers, 1, copy_into)
    assert cache.acquire(1)["w"][0, 0] == 1.0
    cache.release()
    assert cache.acquire(3)["w"][0, 0] == 3.0
    cache.release()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="WaS prefetch thread stopped: OSError"):
        cache.acquire(1)
    assert time.monotonic() - started < 5
