"""The decoder: one implementation for Llama, Qwen2 and Qwen3, switched by ModelSpec flags.

Weights are plain tensors read one by one from a Checkpoint (fused q/k/v and gate/up for fewer
matmuls). A layer runs its projections through `run(op, x)`: the seam where a weight pool answers
for the parts it pools (borrowed weights or a peer's compute) without the decoder knowing which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from sidp.model.attention import AttentionBatch, paged_attention
from sidp.model.checkpoint import Checkpoint
from sidp.model.fused import add_rms_norm_, rms_norm, rotary_, silu_and_mul
from sidp.model.kv_cache import KVCache
from sidp.model.linear import compute_dtype, linear, packed
from sidp.model.rope import RotaryTable
from sidp.model.spec import ModelSpec


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The feed-forward: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""
    return linear(silu_and_mul(linear(x, gate_up)), down)


# A layer's two poolable parts and the projections ("ops") each one runs, in the order a layer runs them.
PART_OPS = {"attn": ("qkv", "o"), "mlp": ("mlp",)}
OP_PART = {op: part for part, ops in PART_OPS.items() for op in ops}
Weights = dict[str, torch.Tensor]


def ops_of(parts: frozenset[str]) -> tuple[str, ...]:
    """The ops that run on `parts`, in the order a layer runs them."""
    return tuple(op for op, part in OP_PART.items() if part in parts)


def read_part(read: Callable[[str], torch.Tensor], spec: ModelSpec, index: int, part: str) -> Weights:
    """One layer's attention projections (q/k/v fused) or MLP (gate/up fused), by name."""
    p = f"model.layers.{index}."
    if part == "mlp":
        gate_up = torch.cat([read(p + "mlp.gate_proj.weight"), read(p + "mlp.up_proj.weight")])
        return {"gate_up": gate_up, "down": read(p + "mlp.down_proj.weight")}
    attn = p + "self_attn."
    weights = {"qkv": torch.cat([read(attn + f"{n}_proj.weight") for n in "qkv"])}
    if spec.attention_bias:
        weights["qkv_bias"] = torch.cat([read(attn + f"{n}_proj.bias") for n in "qkv"])
    weights["o_proj"] = read(attn + "o_proj.weight")
    return weights


def project(op: str, x: torch.Tensor, weights: Weights) -> torch.Tensor:
    """Run one op on `x` with a part's weights: the only math a weight pool ever has to run."""
    if op == "qkv":
        return linear(x, weights["qkv"], weights.get("qkv_bias"))
    if op == "o":
        return linear(x, weights["o_proj"])
    return swiglu(x, weights["gate_up"], weights["down"])


class WeightPool(Protocol):
    """What a decoder asks of a weight pool (see sidp.pool): the parts it serves and how each is run."""

    parts: frozenset[str]  # among "attn", "mlp", "embed"

    def layer(self, index: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """Runs (op, x) for layer `index`'s pooled parts, ops in the order PART_OPS lists them."""

    def tensor(self, name: str) -> torch.Tensor:
        """A pooled whole tensor ("embed", "lm_head") readable in this process."""

    def step(self, num_tokens: int, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one forward pass of `num_tokens` rows (the pool picks how it borrows for this step)."""


class DecoderLayer:
    def __init__(
        self,
        spec: ModelSpec,
        read: Callable[[str], torch.Tensor],
        index: int,
        compute: torch.dtype,
        pooled: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        pooled_parts: frozenset[str] = frozenset(),
    ):
        p = f"model.layers.{index}."
        self.spec = spec
        # Norm weights in the dtype activations flow in (a float32 widening is exact): the kernels take one.
        self.input_norm = read(p + "input_layernorm.weight").to(compute)
        self.post_norm = read(p + "post_attention_layernorm.weight").to(compute)
        self.q_norm = read(p + "self_attn.q_norm.weight").to(compute) if spec.qk_norm else None
        self.k_norm = read(p + "self_attn.k_norm.weight").to(compute) if spec.qk_norm else None
        self.local: Weights = {}  # the parts this process holds for itself
        for part in PART_OPS:
            if part not in pooled_parts:
                self.local.update({k: packed(w) for k, w in read_part(read, spec, index, part).items()})
        self.pooled = pooled
        self.pooled_ops = frozenset(ops_of(pooled_parts))

    def run(self, op: str, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(op, x) if op in self.pooled_ops else project(op, x, self.local)

    def attention(self, x, cos, sin, cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
        s = self.spec
        tokens = x.shape[0]
        q, k, v = self.run("qkv", x).split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = q.view(tokens, s.num_heads, s.head_dim)
        k = k.view(tokens, s.num_kv_heads, s.head_dim)
        v = v.view(tokens, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q = rms_norm(q, self.q_norm, s.rms_norm_eps)
            k = rms_norm(k, self.k_norm, s.rms_norm_eps)
        rotary_(q, k, cos, sin)  # in place: q and k are this step's own (views of its projection)
        out = paged_attention(q, k, v, cache, batch, s.head_dim**-0.5)
        return self.run("o", out.view(tokens, s.q_size))

    def __call__(self, h, delta, cos, sin, cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
        """Adds `delta` (the layer before's MLP output; None for the first layer) and this layer's attention
        to the residual stream h, in place, and returns this layer's MLP output: the next layer, or the final
        norm, adds it in the same pass as its norm."""
        eps = self.spec.rms_norm_eps
        if delta is None:
            normed = rms_norm(h, self.input_norm, eps)
        else:
            normed = add_rms_norm_(h, delta, self.input_norm, eps)
        attended = self.attention(normed, cos, sin, cache, batch)
        return self.run("mlp", add_rms_norm_(h, attended, self.post_norm, eps))


class Decoder:
    """Token ids + attention batch → final hidden states; `logits` projects the rows that sample."""

    def __init__(
        self,
        spec: ModelSpec,
        checkpoint: Checkpoint,
        dtype: torch.dtype,
        max_positions: int,
        pool: WeightPool | None = None,
        device: str = "cpu",
        pack_tied_head: bool = False,
    ):
        """pool, when given, serves the parts it pools; this process reads only the rest, onto `device`.
        pack_tied_head: multiply a tied LM head from a packed copy (the memory plan decides and counts it)."""

        def read(name: str) -> torch.Tensor:
            return checkpoint.read(name, dtype).to(device)

        self.spec = spec
        self.compute_dtype = compute_dtype(dtype, device)
        self.pool = pool
        parts = pool.parts if pool else frozenset()
        if "embed" in parts:
            self.embed, self.lm_head = pool.tensor("embed"), pool.tensor("lm_head")
        else:
            self.embed = read("model.embed_tokens.weight")
            # Lookups need the embedding table plain, so a tied head is packed only as a copy.
            if spec.tie_word_embeddings:
                self.lm_head = packed(self.embed) if pack_tied_head else self.embed
            else:
                self.lm_head = packed(read("lm_head.weight"))
        self.layers = [
            DecoderLayer(spec, read, i, self.compute_dtype, pool.layer(i) if pool else None, parts)
            for i in range(spec.num_layers)
        ]
        self.norm = read("model.norm.weight").to(self.compute_dtype)
        self.rotary = RotaryTable(
            spec.head_dim, spec.rope_theta, spec.rope_scaling, max_positions, self.compute_dtype, device
        )

    def __call__(self, input_ids: torch.Tensor, batch: AttentionBatch, caches: list[KVCache]) -> torch.Tensor:
        if self.pool is None:
            return self._forward(input_ids, batch, caches)
        return self.pool.step(len(input_ids), lambda: self._forward(input_ids, batch, caches))

    def _forward(self, input_ids: torch.Tensor, batch: AttentionBatch, caches: list[KVCache]) -> torch.Tensor:
        cos, sin = self.rotary.lookup(batch.positions)
        h = self.embed[input_ids].to(self.compute_dtype)  # a copy: the layers add to it in place
        delta = None
        for layer, cache in zip(self.layers, caches, strict=True):
            delta = layer(h, delta, cos, sin, cache, batch)
        return add_rms_norm_(h, delta, self.norm, self.spec.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """In the compute dtype: greedy sampling reads them as they are, sampling widens its rows."""
        return linear(hidden, self.lm_head)
