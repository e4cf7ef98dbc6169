"""ModelSpec: the facts of a decoder-only checkpoint that the engine needs, read from an HF config dict.

One spec serves Llama, Qwen2 and Qwen3: they differ only in flags (q/k/v bias, q/k RMSNorm, tied
embeddings, rope scaling), so one decoder implementation reads the flags instead of three copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidp.errors import SidpError

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass(slots=True, frozen=True)
class ModelSpec:
    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    rope_scaling: dict | None = None
    eos_token_ids: tuple[int, ...] = field(default=())

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelSpec:
        family = config.get("model_type", "")
        if family not in SUPPORTED_FAMILIES:
            raise SidpError(
                f"Model type {family!r} is not supported; sidp runs {', '.join(SUPPORTED_FAMILIES)} models."
            )
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            eos = config.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                family=family,
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(config)),
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", family == "qwen2")),
                qk_norm=family == "qwen3",
                rope_scaling=_rope_scaling(config),
                eos_token_ids=eos_ids,
            )
        except KeyError as missing:
            raise SidpError(
                f"The model's config.json lacks {missing}; is it a complete Hugging Face config?"
            ) from None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes


def _rope_theta(config: dict) -> float:
    # transformers 5 moved rope_theta into rope_parameters; older configs keep it at the top level.
    params = config.get("rope_parameters") or {}
    return params.get("rope_theta", config.get("rope_theta", 10000.0))


def _rope_scaling(config: dict) -> dict | None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or None
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise SidpError(
            f"RoPE scaling {kind!r} is not supported yet (sidp supports the default and 'llama3')."
        )
    return dict(scaling)
