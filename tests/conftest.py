"""Tiny random Hugging Face checkpoints (Llama, Qwen2, Qwen3), built offline once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

VOCAB = 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    # Llama carries Llama-3.1's rope scaling so that path is checked against transformers too.
    "llama": lambda tied, layers: LlamaConfig(
        **{**COMMON, "num_hidden_layers": layers},
        tie_word_embeddings=tied,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": lambda tied, layers: Qwen2Config(
        **{**COMMON, "num_hidden_layers": layers}, tie_word_embeddings=tied, rope_theta=1000000.0
    ),
    "qwen3": lambda tied, layers: Qwen3Config(
        **{**COMMON, "num_hidden_layers": layers}, head_dim=32, tie_word_embeddings=tied, rope_theta=1000000.0
    ),
}


def _tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: enough for text round trips and chat templates, no files needed."""
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for code in range(32, 32 + VOCAB - len(specials)):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(path: Path, family: str, tied: bool, layers: int = 3) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](tied, layers), dtype=torch.float32)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, tied=False, layers=3) → folder of a saved random checkpoint (cached per session)."""
    built: dict[tuple[str, bool, int], Path] = {}

    def get(family: str, tied: bool = False, layers: int = 3) -> Path:
        key = (family, tied, layers)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{family}-{'tied' if tied else 'untied'}-{layers}")
            built[key] = build_tiny_model(folder, family, tied, layers)
        return built[key]

    return get
