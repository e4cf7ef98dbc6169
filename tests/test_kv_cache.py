"""The KV cache's two layouts: the tiles layout (bf16 where the CPU path has AMX) writes, gathers and attends
to the same values as the rows layout, and an engine on it generates the same tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import over_runtime, random_prompts

from sidp import LLM, SamplingParams
from sidp.model import cpu_kernels, kv_cache
from sidp.model.kv_cache import KVCache, TiledKVCache, new_kv_cache, to_tiles
from sidp.model.paged_attention import paged_decode_attention_reference, paged_decode_attention_tiles

on_amx = cpu_kernels.chosen_path() == "amx"
needs_amx = pytest.mark.skipif(
    not on_amx, reason="the tiles layout is taken only where the amx CPU path runs"
)


def test_layout_is_tiles_only_for_bf16_on_amx_and_shapes_that_tile():
    def layout(dtype=torch.bfloat16, block_size=16, heads=(9, 3), head_dim=64):
        return type(new_kv_cache(4, block_size, *heads, head_dim, dtype, "cpu"))

    assert layout() is (TiledKVCache if on_amx else KVCache)
    assert layout(dtype=torch.float32) is KVCache
    assert layout(block_size=24) is KVCache
    assert layout(head_dim=48) is KVCache
    assert layout(heads=(17, 1)) is KVCache


def poisoned_problem(lens, heads, kv_heads, head_dim, block_size, seed):
    """A shuffled paged cache in both layouts, the tiles' copy NaN past every context (its blocks' tails
    hold whatever was there before), and q."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + 3
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=g).bfloat16()
    v = torch.randn(shape, generator=g).bfloat16()
    ids = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.int32)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    start = 0
    for i, (n, m) in enumerate(zip(lens, per_seq, strict=True)):
        tables[i, :m] = ids[start : start + m]
        start += m
        last = int(tables[i, m - 1])
        poisoned_k[last, n - (m - 1) * block_size :] = float("nan")
        poisoned_v[last, n - (m - 1) * block_size :] = float("nan")
    q = torch.randn(len(lens), heads, head_dim, generator=g).bfloat16()
    return q, (k, v), to_tiles(poisoned_k, poisoned_v), tables, torch.tensor(lens, dtype=torch.int32)


@needs_amx
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, block_size",
    [(9, 3, 64, 16), (8, 2, 128, 32), (14, 2, 64, 16), (4, 4, 32, 48), (16, 1, 64, 16), (21, 7, 64, 16)],
    ids=["smollm2", "dim128-block32", "group7", "dim32-block48", "group16", "seven-kv-heads"],
)
@pytest.mark.parametrize("batch", [1, 37], ids=["a-task-per-kv-head", "a-task-per-sequence"])
def test_tiles_kernel_matches_the_reference(heads, kv_heads, head_dim, block_size, batch):
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 5 * block_size, (batch,), generator=g).tolist()
    lens[0] = 5 * block_size  # one context that fills its last block
    q, (k, v), (k_tiles, v_tiles), tables, context_lens = poisoned_problem(
        lens, heads, kv_heads, head_dim, block_size, seed=batch
    )
    got = paged_decode_attention_tiles(q, k_tiles, v_tiles, tables, context_lens, head_dim**-0.5)
    want = paged_decode_attention_reference(
        q.float(), k.float(), v.float(), tables, context_lens, head_dim**-0.5
    )
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-5)


@needs_amx
def test_tiles_kernel_reads_query_rows_in_place():
    q, _, (k_tiles, v_tiles), tables, lens = poisoned_problem([5, 40, 77], 9, 3, 64, 16, seed=1)
    wide = torch.full((3, 9 * 64 * 2), float("nan"), dtype=torch.bfloat16)  # rows of a wider projection
    wide[:, : 9 * 64] = q.reshape(3, -1)
    strided = wide[:, : 9 * 64].view(3, 9, 64)
    torch.testing.assert_close(
        paged_decode_attention_tiles(strided, k_tiles, v_tiles, tables, lens, 0.125),
        paged_decode_attention_tiles(q, k_tiles, v_tiles, tables, lens, 0.125),
        rtol=0,
        atol=0,
    )


@needs_amx
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16], ids=str)
def test_tiles_write_and_gather_hold_what_rows_do(source):
    """Writes of single tokens and of a run of them (stored two tokens at a time) hold the same values as
    the rows layout, and a gather reads them back."""
    g = torch.Generator().manual_seed(0)
    rows = KVCache(
        torch.zeros(6, 32, 2, 64, dtype=torch.bfloat16), torch.zeros(6, 32, 2, 64, dtype=torch.bfloat16)
    )
    tiles = TiledKVCache(*to_tiles(rows.k, rows.v))
    # a prefill's run of slots from an odd one (its first token has no partner in the run), then scattered
    slots = torch.cat([torch.arange(33, 80), 100 + torch.randperm(92, generator=g)[:23]])
    k, v = (torch.randn(70, 2, 64, generator=g).to(source) for _ in range(2))
    rows.write(slots, k, v)
    tiles.write(slots, k, v)
    for got, want in zip((tiles.k, tiles.v), to_tiles(rows.k, rows.v), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(tiles.gather(slots[::3]), rows.gather(slots[::3]), strict=True):
        assert torch.equal(got, want)


@needs_amx
def test_engine_on_tiles_generates_what_it_does_on_rows(tiny_model, monkeypatch):
    """bf16 Qwen3 (head_dim 32) with prompts chunked over steps and sharing prefixes, so that decode, the
    writes and the prefix gathers all go through the tiles layout."""
    path = tiny_model("qwen3")
    shared = random_prompts([48])[0]
    prompts = [shared + p for p in random_prompts([5, 40, 17, 60])] + random_prompts([3, 33])
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def run() -> tuple[list[list[int]], type]:
        llm = LLM(path, dtype="bfloat16", memory_per_replica=over_runtime("64MiB"), max_num_batched_tokens=32)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs], type(llm.engine.runner.kv_caches[0])

    tiled, layout = run()
    assert layout is TiledKVCache
    monkeypatch.setattr(kv_cache, "tiles_fit", lambda *args: False)
    rows, layout = run()
    assert layout is KVCache
    assert tiled == rows


@needs_amx
def test_tiles_kernel_refuses_what_it_cannot_read():
    q, _, (k_tiles, v_tiles), tables, lens = poisoned_problem([5, 40], 9, 3, 64, 16, seed=2)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        paged_decode_attention_tiles(q.float(), k_tiles.float(), v_tiles.float(), tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="do not match"):
        paged_decode_attention_tiles(q, k_tiles, v_tiles[:, :, :4], tables, lens, 0.125)
    other = next(path for path in cpu_kernels.supported_paths() if path != "amx")
    with pytest.raises(RuntimeError, match="no AMX tiles"):
        cpu_kernels.ops(other).paged_decode_attention_tiles(q, k_tiles, v_tiles, tables, lens, 0.125)
