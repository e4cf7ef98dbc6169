"""The memory ledger counts what a replica holds: its weight rows are the bytes of the tensors held, its
runtime and stop-string decoder are measured, KV is the rest of the budget. (What the whole process holds
is measured by `sidp bench`: sidp/bench/resident.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import over_runtime

from sidp import LLM, SamplingParams, memory, runtime_memory
from sidp.model.checkpoint import load_decoder, load_tokenizer, read_config
from sidp.model.linear import packs
from sidp.model.spec import ModelSpec


def held_weight_bytes(model) -> int:
    tensors = {id(t): t for t in (model.embed, model.lm_head, model.norm)}
    for layer in model.layers:
        parts = [*vars(layer).values(), *layer.local.values()]
        tensors.update({id(t): t for t in parts if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_ledger_counts_the_weights_held_and_gives_the_rest_to_kv(tiny_model, family, tied, dtype):
    llm = LLM(tiny_model(family, tied), dtype=dtype, memory_per_replica=over_runtime("32MiB"))
    plan, runner = llm.engine.plan, llm.engine.runner
    assert plan.weight_total == held_weight_bytes(runner.model)
    kv_held = sum(c.k.nbytes + c.v.nbytes for c in runner.kv_caches)
    assert kv_held == plan.kv_bytes
    assert (
        0
        <= plan.budget - plan.overhead_total - plan.weight_total - plan.workspace - plan.kv_bytes
        < plan.block_bytes
    )
    assert plan.kv_tokens == plan.num_blocks * 16


def test_start_up_prints_vllm_lines(tiny_model, capfd):
    llm = LLM(
        tiny_model("llama"), dtype="float32", memory_per_replica=over_runtime("32MiB"), max_model_len=512
    )
    text = capfd.readouterr().err
    assert f"KV cache size: {llm.engine.plan.kv_tokens:,} tokens" in text
    assert f"Maximum concurrency for 512 tokens per request: {llm.engine.plan.kv_tokens / 512:.2f}x" in text


def test_a_tied_head_gets_its_packed_copy_only_where_it_is_cheap(tiny_model, monkeypatch):
    """The copy is counted as weights, and made only where it is at most 1/8 of what the KV cache gets."""
    monkeypatch.setattr(memory, "packs", lambda dtype: dtype != torch.float32)  # the arithmetic, on any CPU
    spec = ModelSpec.from_hf_config(read_config(tiny_model("qwen2", True)))
    copy = spec.vocab_size * spec.hidden_size * 2

    def plan(budget, dtype=torch.bfloat16, spec=spec, share=None, device="cpu"):
        return memory.plan_memory(spec, dtype, budget, 16, 256, 16, share=share, device=device)

    roomy = plan(64 * 2**20)
    assert roomy.packs_tied_head and roomy.weights[memory.TIED_HEAD_COPY] == copy
    assert roomy.kv_bytes <= roomy.budget - roomy.overhead_total - roomy.weight_total - roomy.workspace
    tight = plan(roomy.weight_total - copy + roomy.overhead_total + roomy.workspace + 4 * copy)
    assert not tight.packs_tied_head and memory.TIED_HEAD_COPY not in tight.weights
    assert not plan(64 * 2**20, dtype=torch.float32).packs_tied_head
    assert not plan(64 * 2**20, device="cuda").packs_tied_head
    pooled = memory.PoolShare(frozenset({"mlp", "embed"}), 1, True, 2, 0)
    assert not plan(64 * 2**20, share=pooled).packs_tied_head
    untied = ModelSpec.from_hf_config(read_config(tiny_model("qwen2", False)))
    assert not plan(64 * 2**20, spec=untied).packs_tied_head


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_packed_tied_head_samples_what_the_plain_one_does(tiny_model, dtype):
    if not packs(getattr(torch, dtype)):
        pytest.skip(f"this CPU multiplies {dtype} weights unpacked (sidp.model.linear.packs)")
    llm = LLM(tiny_model("qwen2", True), dtype=dtype, memory_per_replica=over_runtime("64MiB"))
    model = llm.engine.runner.model
    assert llm.engine.plan.packs_tied_head and model.lm_head.is_mkldnn
    prompts = [{"prompt_token_ids": [5, 9, 14, 3]}, {"prompt_token_ids": [7, 7, 2]}]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def greedy() -> list[list[int]]:
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]

    packed = greedy()
    model.lm_head = model.embed
    assert greedy() == packed
    llm.close()


def test_what_a_replica_holds_beyond_the_arithmetic_is_measured_once_and_counted(
    tiny_model, tmp_path, monkeypatch
):
    """The runtime and the stop-string decoder: each measured by a fresh process, then read from the cache."""
    llm = LLM(tiny_model("llama"), dtype="float32", memory_per_replica=over_runtime("32MiB"))
    rows = llm.engine.plan.overheads
    assert rows[memory.RUNTIME] == runtime_memory.runtime_bytes("cpu") > 100 * 2**20  # torch alone is more
    # in the driver's process the replica decodes stop strings with the driver's tokenizer, counted
    assert rows["the driver's tokenizer (same process)"] > 0 == rows["stop-string decoder (on first use)"]
    alone = runtime_memory.decoder_bytes(str(tiny_model("llama")), "cpu")
    assert 0 < alone < rows["the driver's tokenizer (same process)"]  # what a replica of a group loads
    monkeypatch.setattr(runtime_memory, "_cache_folder", lambda: tmp_path)
    measured = runtime_memory._cached("runtime", [])  # an empty cache: a fresh process measures
    assert 100 * 2**20 < measured < 2**30
    cached = tmp_path / "runtime.json"
    cached.write_text('{"rss_bytes": 12345}')
    assert runtime_memory._cached("runtime", []) == 12345  # read back, not measured again


def test_the_stop_string_decoder_decodes_as_the_tokenizer_does(tiny_model):
    path = tiny_model("qwen3")
    tokenizer = load_tokenizer(path)
    decode = load_decoder(path)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, len(tokenizer), (8,), generator=g).tolist()  # special tokens among them
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
