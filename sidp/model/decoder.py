"""The decoder: one implementation for Llama, Qwen2 and Qwen3, switched by ModelSpec flags.

Weights are plain tensors read one by one from a Checkpoint (fused q/k/v and gate/up for fewer
matmuls). A layer's MLP is a separate callable object: the seam where a later weight provider can
answer with pooled weights instead of local ones without the decoder knowing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sidp.model.attention import AttentionBatch, KVCache, paged_attention
from sidp.model.checkpoint import Checkpoint
from sidp.model.linear import compute_dtype, linear
from sidp.model.rope import RotaryTable, apply_rotary
from sidp.model.spec import ModelSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and scale in the model dtype, the order transformers uses.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The feed-forward: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)


def read_mlp(read: Callable[[str], torch.Tensor], index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up, down) of one layer, gate and up stacked."""
    p = f"model.layers.{index}.mlp."
    return torch.cat([read(p + "gate_proj.weight"), read(p + "up_proj.weight")]), read(p + "down_proj.weight")


class Mlp:
    """A layer's feed-forward on weights this process holds."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        self.gate_up = gate_up
        self.down = down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_up, self.down)


class DecoderLayer:
    def __init__(
        self, spec: ModelSpec, read: Callable[[str], torch.Tensor], index: int, mlp: Callable | None = None
    ):
        p = f"model.layers.{index}."
        self.spec = spec
        self.input_norm = read(p + "input_layernorm.weight")
        self.post_norm = read(p + "post_attention_layernorm.weight")
        attn = p + "self_attn."
        self.qkv = torch.cat([read(attn + f"{n}_proj.weight") for n in "qkv"])
        self.qkv_bias = (
            torch.cat([read(attn + f"{n}_proj.bias") for n in "qkv"]) if spec.attention_bias else None
        )
        self.o_proj = read(attn + "o_proj.weight")
        self.q_norm = read(attn + "q_norm.weight") if spec.qk_norm else None
        self.k_norm = read(attn + "k_norm.weight") if spec.qk_norm else None
        self.mlp: Callable[[torch.Tensor], torch.Tensor] = mlp or Mlp(*read_mlp(read, index))

    def attention(self, x, cos, sin, cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
        s = self.spec
        tokens = x.shape[0]
        q, k, v = linear(x, self.qkv, self.qkv_bias).split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = q.view(tokens, s.num_heads, s.head_dim)
        k = k.view(tokens, s.num_kv_heads, s.head_dim)
        v = v.view(tokens, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q = rms_norm(q, self.q_norm, s.rms_norm_eps)
            k = rms_norm(k, self.k_norm, s.rms_norm_eps)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, cache, batch, s.head_dim**-0.5)
        return linear(out.view(tokens, s.q_size), self.o_proj)

    def __call__(self, x, cos, sin, cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
        eps = self.spec.rms_norm_eps
        x = x + self.attention(rms_norm(x, self.input_norm, eps), cos, sin, cache, batch)
        return x + self.mlp(rms_norm(x, self.post_norm, eps))


class Decoder:
    """Token ids + attention batch → final hidden states; `logits` projects the rows that sample."""

    def __init__(
        self,
        spec: ModelSpec,
        checkpoint: Checkpoint,
        dtype: torch.dtype,
        max_positions: int,
        mlps: list[Callable] | None = None,
    ):
        """mlps, when given, replaces each layer's feed-forward (a weight provider's answer)."""

        def read(name: str) -> torch.Tensor:
            return checkpoint.read(name, dtype)

        self.spec = spec
        self.compute_dtype = compute_dtype(dtype)
        self.embed = read("model.embed_tokens.weight")
        mlps = mlps or [None] * spec.num_layers
        self.layers = [DecoderLayer(spec, read, i, mlps[i]) for i in range(spec.num_layers)]
        self.norm = read("model.norm.weight")
        self.lm_head = self.embed if spec.tie_word_embeddings else read("lm_head.weight")
        self.rotary = RotaryTable(
            spec.head_dim, spec.rope_theta, spec.rope_scaling, max_positions, self.compute_dtype
        )

    def __call__(self, input_ids: torch.Tensor, batch: AttentionBatch, caches: list[KVCache]) -> torch.Tensor:
        cos, sin = self.rotary.lookup(batch.positions)
        x = self.embed[input_ids].to(self.compute_dtype)
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, cos, sin, cache, batch)
        return rms_norm(x, self.norm, self.spec.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head).float()
