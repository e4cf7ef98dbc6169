"""The per-replica memory ledger: budget → runtime + weights + workspace → KV blocks.

The ledger is a budget: its rows are upper estimates of what a replica process holds, so that the process
stays within `memory_per_replica` (`sidp bench` measures each replica's peak PSS beside it). The runtime
(Python, torch, the kernels), the stop-string decoder and, for a replica in the driver's process, the
driver's tokenizer are measured once per install by a fresh process (sidp/runtime_memory.py); every
other row is arithmetic on the model spec, known before a single weight is read. The machine enters
in two more places: the compute dtype (float32 where the CPU cannot multiply bf16 natively), and the packed
copy of a tied LM head (only where it can). The workspace counts the activations that the largest step
keeps alive at once (one layer's worth, since layers run one after another).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from sidp.errors import DoesNotFit, SidpError
from sidp.model.linear import compute_dtype, packs, scratch_bytes
from sidp.model.spec import ModelSpec

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(value: int | float | str) -> int:
    """600MiB, 2GB, 1.5GiB or a plain number of bytes."""
    if isinstance(value, int | float):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise SidpError(
            f"Cannot read the memory size {value!r}: write bytes or a number with a unit, like 600MiB or 2GB."
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def default_memory_per_replica(num_replicas: int = 1) -> int:
    """Half of this machine's RAM shared among the replicas: room for the OS, the driver and spikes."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // 2 // num_replicas


def layer_weight_bytes(spec: ModelSpec, dtype_bytes: int) -> dict[str, int]:
    """One decoder layer's bytes: its two poolable parts (attention projections, MLP) and its norms."""
    h = spec.hidden_size
    attn = (spec.q_size + 2 * spec.kv_size) * h + spec.q_size * h
    attn += (spec.q_size + 2 * spec.kv_size) if spec.attention_bias else 0
    norms = 2 * h + (2 * spec.head_dim if spec.qk_norm else 0)
    return {
        "attention": attn * dtype_bytes,
        "mlp": 3 * h * spec.intermediate_size * dtype_bytes,
        "norms": norms * dtype_bytes,
    }


def weight_bytes(spec: ModelSpec, dtype_bytes: int) -> dict[str, int]:
    """Bytes of every weight the decoder holds, by part."""
    per_layer = layer_weight_bytes(spec, dtype_bytes)
    embed = spec.vocab_size * spec.hidden_size * dtype_bytes
    return {
        "embedding": embed,
        "lm_head": 0 if spec.tie_word_embeddings else embed,
        "attention": per_layer["attention"] * spec.num_layers,
        "mlp": per_layer["mlp"] * spec.num_layers,
        "norms": per_layer["norms"] * spec.num_layers + spec.hidden_size * dtype_bytes,
    }


@dataclass(frozen=True, slots=True)
class PoolShare:
    """What one SiDP replica holds of the group's pool, for its ledger."""

    parts: frozenset[str]  # pooled parts: "mlp", "attn", "embed"
    owned_layers: int
    holds_embedding: bool  # owns the pooled embedding / LM head
    cache_slots: int  # WaS slots (0 where the mode never copies weights)
    cas_peers: int  # owners it sends activations to, and requesters it serves (0 without CaS)


LAYER_PART_ROWS = {"mlp": "mlp", "attn": "attention"}  # poolable part of a layer -> its ledger row


def piece_bytes(spec: ModelSpec, dtype_bytes: int, parts: frozenset[str]) -> int:
    """One layer's pooled bytes: the size of a WaS cache slot."""
    per_layer = layer_weight_bytes(spec, dtype_bytes)
    return sum(per_layer[row] for part, row in LAYER_PART_ROWS.items() if part in parts)


def pooled_weights(
    spec: ModelSpec, dtype: torch.dtype, share: PoolShare, device: str = "cpu"
) -> dict[str, int]:
    """weight_bytes for a SiDP replica: owned layers only for pooled parts, plus the pool's own buffers."""
    from sidp.pool.cas import cas_buffer_bytes  # the pool sizes its buffers; the ledger counts them

    weights = weight_bytes(spec, dtype.itemsize)
    per_layer = layer_weight_bytes(spec, dtype.itemsize)
    for part, row in LAYER_PART_ROWS.items():
        if part in share.parts:
            weights[row] = per_layer[row] * share.owned_layers
    if "embed" in share.parts and not share.holds_embedding:
        weights["embedding"] = weights["lm_head"] = 0
    weights["pool: WaS cache slots"] = share.cache_slots * piece_bytes(spec, dtype.itemsize, share.parts)
    weights["pool: CaS buffers"] = cas_buffer_bytes(spec, dtype, share.cas_peers, device)
    return weights


def workspace_bytes(
    spec: ModelSpec, dtype: torch.dtype, max_tokens: int, max_seqs: int, device: str = "cpu"
) -> int:
    """Peak live activations of one layer for the largest step (in the compute dtype; the MLP holds its
    input, gate/up, their product and the down projection's input at once: 4×ffn), float32 logits for
    every sequence, and the matmul scratch where the CPU multiplies through float32."""
    h, q, kv, ffn = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    per_token = (5 * h + 3 * q + 3 * kv + 4 * ffn) * compute_dtype(dtype, device).itemsize + 2 * h * 4
    return max_tokens * per_token + max_seqs * spec.vocab_size * 4 * 2 + scratch_bytes(dtype, device)


def rotary_bytes(spec: ModelSpec, dtype: torch.dtype, positions: int, device: str = "cpu") -> int:
    """The cos/sin table, one row of head_dim per position (sidp.model.rope)."""
    return 2 * positions * spec.head_dim * compute_dtype(dtype, device).itemsize


def prefix_gather_bytes(
    spec: ModelSpec, dtype: torch.dtype, chunk: int, context: int, device: str = "cpu"
) -> int:
    """A prefill chunk over cached tokens gathers its context's K and V out of the blocks (widened to the
    compute dtype where that differs) and masks [chunk, context] (sidp.model.attention)."""
    widened = compute_dtype(dtype, device)
    per_token = 2 * spec.kv_size * (dtype.itemsize + (widened.itemsize if widened != dtype else 0))
    return context * per_token + chunk * context


@dataclass(slots=True)
class MemoryPlan:
    budget: int
    weights: dict[str, int]
    workspace: int
    block_size: int
    block_bytes: int
    num_blocks: int
    overheads: dict[str, int] = field(default_factory=dict)  # runtime, tokenizers, rotary, prefix gather

    @property
    def weight_total(self) -> int:
        return sum(self.weights.values())

    @property
    def overhead_total(self) -> int:
        return sum(self.overheads.values())

    @property
    def packs_tied_head(self) -> bool:
        return TIED_HEAD_COPY in self.weights

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def rows(self) -> dict[str, int]:
        rows = {name: n for name, n in self.overheads.items() if n}
        for part, n in self.weights.items():
            if n:
                rows[part if part.startswith("pool") else f"weights: {part}"] = n
        rows["activation workspace"] = self.workspace
        rows["KV cache"] = self.kv_bytes
        rows["unused (less than a block)"] = (
            self.budget - self.overhead_total - self.weight_total - self.workspace - self.kv_bytes
        )
        rows["budget"] = self.budget
        return rows

    def report(self, max_model_len: int, plain: MemoryPlan | None = None) -> str:
        """vLLM's two lines and a breakdown; beside plain DP's for the same budget when given."""
        columns = [plain, self] if plain else [self]
        tables = [c.rows() for c in columns]
        names = list(dict.fromkeys(name for t in reversed(tables) for name in t))  # this plan's order
        width = max(map(len, names))
        lines = [
            f"  {name:<{width}}" + "".join(f"  {format_bytes(t.get(name, 0)):>12}" for t in tables)
            for name in names
        ]
        lines.append(f"  {'KV tokens':<{width}}" + "".join(f"  {c.kv_tokens:>12,}" for c in columns))
        heading = "Memory per replica:"
        if plain:
            heading = (
                f"Memory per replica, plain DP beside SiDP ({self.kv_tokens / plain.kv_tokens:.2f}x KV):"
            )
            lines.insert(0, f"  {'':<{width}}  {'plain DP':>12}  {'SiDP':>12}")
        return (
            f"KV cache size: {self.kv_tokens:,} tokens\n"
            f"Maximum concurrency for {max_model_len:,} tokens per request: "
            f"{self.kv_tokens / max_model_len:.2f}x\n" + "\n".join([heading, *lines])
        )


# A tied LM head multiplies faster from a copy in oneDNN's packed layout (the embedding lookups need the
# plain table): 2-3x in bf16 on AMX, and in float32 on AMD CPUs (linear.packs) faster than MKL multiplies the
# plain one. The copy is made when it costs at most this share of what is left for the KV cache.
TIED_HEAD_COPY = "lm_head (packed copy of the tied embedding)"
TIED_HEAD_COPY_MAX_SHARE = 1 / 8


def tied_head_copy_bytes(spec: ModelSpec, dtype: torch.dtype, share: PoolShare | None, device: str) -> int:
    """The bytes of the packed copy a tied head would take on this replica; 0 where none is made."""
    if not spec.tie_word_embeddings or device != "cpu" or not packs(dtype):
        return 0
    if share and "embed" in share.parts:  # the pool serves the head
        return 0
    return spec.vocab_size * spec.hidden_size * dtype.itemsize


RUNTIME = "runtime (Python, torch, kernels; measured)"


def plan_memory(
    spec: ModelSpec,
    dtype: torch.dtype,
    budget: int,
    block_size: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    share: PoolShare | None = None,
    device: str = "cpu",
    max_model_len: int | None = None,
    runtime: int = 0,
    decoder: int = 0,
    driver: int = 0,
) -> MemoryPlan:
    """share: what this replica holds of a SiDP pool (None: the whole model, plain DP). device: where
    the replica computes ("cuda" when the planner sizes a GPU). max_model_len: the longest sequence
    (None: the model's limit), which sizes the rotary table and a prefill's gathered context. runtime,
    decoder: what the process holds before its weights, and adds on its first stop string; driver: the
    driver's tokenizer, for a replica in the driver's process (sidp.runtime_memory; 0 where the budget is
    a GPU's)."""
    weights = pooled_weights(spec, dtype, share, device) if share else weight_bytes(spec, dtype.itemsize)
    # Norm weights are held in the compute dtype (sidp.model.decoder): float32 where bf16 is widened.
    weights["norms"] = weights["norms"] // dtype.itemsize * compute_dtype(dtype, device).itemsize
    workspace = workspace_bytes(spec, dtype, max_num_batched_tokens, max_num_seqs, device)
    block_bytes = spec.kv_bytes_per_token(dtype.itemsize) * block_size
    longest = max_model_len or spec.max_position_embeddings
    overheads = {
        RUNTIME: runtime,
        "stop-string decoder (on first use)": decoder,
        "the driver's tokenizer (same process)": driver,
        "rotary table": rotary_bytes(spec, dtype, longest, device),
    }
    held = sum(weights.values()) + sum(overheads.values())
    free = budget - held - workspace
    context = min(longest, max(free, 0) // block_bytes * block_size)  # no prefill sees more than the KV holds
    gather = prefix_gather_bytes(spec, dtype, min(max_num_batched_tokens, longest), context, device)
    overheads["prefix attention (gathered K/V, mask)"] = gather
    held, free = held + gather, free - gather
    copy = tied_head_copy_bytes(spec, dtype, share, device)
    if copy and copy <= (free - copy) * TIED_HEAD_COPY_MAX_SHARE:
        weights[TIED_HEAD_COPY] = copy
        held, free = held + copy, free - copy
    if free < block_bytes:
        need = held + workspace + block_bytes
        raise DoesNotFit(
            f"memory_per_replica={format_bytes(budget)} cannot hold this model: weights take "
            f"{format_bytes(sum(weights.values()))}, the runtime and fixed buffers "
            f"{format_bytes(sum(overheads.values()))} and the step workspace {format_bytes(workspace)}; "
            f"give at least {need:,} bytes ({format_bytes(need)}), plus room for the KV cache."
        )
    return MemoryPlan(budget, weights, workspace, block_size, block_bytes, free // block_bytes, overheads)
