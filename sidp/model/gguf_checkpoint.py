"""The GGUF side of Checkpoint: llama.cpp names and layouts turned back into Hugging Face ones, lazily.

Each `read` dequantizes one tensor to float32, so a quantized GGUF runs as the float model it came from;
its config is synthesized from the metadata with the keys of a Hugging Face config.json.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidp.errors import SidpError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# general.file_type values whose tensors are all one float type; anything quantized reads back as float32.
FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


class GGUFCheckpoint:
    """One .gguf file, opened once; tensors are dequantized and renamed on `read`."""

    def __init__(self, file: Path):
        from gguf import GGUFReader

        try:
            self._reader = GGUFReader(file)
        except Exception as error:  # GGUFReader raises ValueError, struct errors, OSError...
            raise SidpError(
                f"Cannot read {file}: {error}. The file is corrupt or not a GGUF; download it again."
            ) from None
        self.file = file
        self.arch = self._string("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise SidpError(
                f"GGUF architecture {self.arch!r} is not supported; sidp reads "
                f"{', '.join(ARCHITECTURES)} GGUFs."
            )
        by_gguf_name = {t.name: t for t in self._reader.tensors}
        if "rope_freqs.weight" in by_gguf_name:
            raise SidpError(
                "This GGUF uses Llama-3 rope scaling (a rope_freqs tensor), which sidp does not "
                "read from GGUF yet; use the model's safetensors checkpoint."
            )
        scaling = self._field(f"{self.arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise SidpError(
                f"This GGUF uses {scaling!r} rope scaling, which sidp does not read from GGUF "
                "yet; use the model's safetensors checkpoint."
            )
        self._tensors = {_hf_name(name): t for name, t in by_gguf_name.items()}

    def names(self) -> list[str]:
        return list(self._tensors)

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self._tensors.get(name)
        if tensor is None:
            raise SidpError(
                f"Tensor {name!r} is not in {self.file.name}; is it a complete model of a supported family?"
            )
        # GGUF lists dims innermost first (ne[0] = input features), so row-major HF order is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        array = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        # Only llama.cpp's LlamaModel converter permutes q/k (weights and biases); its Qwen2/Qwen3 converters
        # write HF rows unchanged, as both already use HF's rotate-half rope.
        if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = self._int("attention.head_count")
            if ".k_proj." in name:
                heads = self._int("attention.head_count_kv", heads)
            array = _unpermute(array, heads)
        # F32 tensors come back as read-only views of the memory-mapped file: copy those to own the memory.
        owned = np.array(array, dtype=np.float32, order="C", copy=None if array.flags.writeable else True)
        return torch.from_numpy(owned).to(dtype=dtype)

    def config(self) -> dict[str, Any]:
        """The metadata as a Hugging Face config dict (the keys transformers' `to_dict()` uses)."""
        hidden = self._int("embedding_length")
        heads = self._int("attention.head_count")
        head_dim = self._int("attention.key_length", hidden // heads)
        rope_dim = self._int("rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise SidpError(
                f"This GGUF rotates {rope_dim} of {head_dim} head dimensions, which sidp does "
                "not support; use the model's safetensors checkpoint."
            )
        theta = _f32(self._field(f"{self.arch}.rope.freq_base", 10000.0))
        config = {
            "model_type": self.arch,
            "architectures": [ARCHITECTURES[self.arch]],
            "hidden_size": hidden,
            "intermediate_size": self._int("feed_forward_length"),
            "num_hidden_layers": self._int("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._int("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": _f32(self._field(f"{self.arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
            # transformers 5 keeps rope_theta here; both spellings let either reader find it.
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "max_position_embeddings": self._int("context_length"),
            # The embedding's rows, not len(tokenizer.ggml.tokens): HF's vocab_size sizes the weights.
            "vocab_size": self._embedding_rows(),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "torch_dtype": FILE_DTYPES.get(self._field("general.file_type"), "float32"),
        }
        if self.arch == "llama":
            config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        return config

    def chat_template(self) -> str | None:
        return self._field("tokenizer.chat_template")

    def _embedding_rows(self) -> int:
        embedding = self._tensors.get("model.embed_tokens.weight")
        if embedding is None:
            raise SidpError(f"{self.file.name} has no token_embd tensor; is it a complete model file?")
        return int(embedding.shape[-1])  # GGUF shape is (hidden, vocab): innermost dim first

    def _field(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _string(self, key: str) -> str:
        value = self._field(key)
        if not isinstance(value, str):
            raise SidpError(f"{self.file.name} lacks the GGUF metadata {key!r}; is it a complete model file?")
        return value

    def _int(self, key: str, default: int | None = None) -> int:
        value = self._field(f"{self.arch}.{key}", default)
        if value is None:
            raise SidpError(
                f"{self.file.name} lacks the GGUF metadata '{self.arch}.{key}'; is it a complete model file?"
            )
        return int(value)


def open_gguf(file: Path) -> GGUFCheckpoint:
    """The GGUFCheckpoint of file, shared by read_config, open_checkpoint and load_tokenizer."""
    stat = file.stat()
    return _open_cached(str(file.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_cached(file: str, mtime_ns: int, size: int) -> GGUFCheckpoint:
    # mtime and size are in the key so a file replaced on disk is opened afresh.
    return GGUFCheckpoint(Path(file))


def _hf_name(gguf_name: str) -> str:
    stem, _, kind = gguf_name.rpartition(".")
    if stem in GLOBAL_NAMES and kind == "weight":
        return f"{GLOBAL_NAMES[stem]}.weight"
    match = LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
    raise SidpError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart that sidp knows; "
        "use the model's safetensors checkpoint."
    )


def _unpermute(array: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which interleaves each head's rows (HF's rotate-half halves → pairs)."""
    rows = array.shape[0]
    return array.reshape(heads, rows // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def _f32(value: float) -> float:
    # GGUF stores float32, so 1e-5 comes back as 9.99999974e-06; the shortest float32 repr restores 1e-5.
    return float(str(np.float32(value)))
