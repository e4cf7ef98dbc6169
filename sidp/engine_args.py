"""EngineArgs: what a user of sidp sets, with one set of defaults for `LLM(...)` and the command line
(vLLM's pattern), and `resolve()`: the group plan everything runs from, checked once and immutable.

The plan holds the device, the placement and mode, and each replica's memory ledger; `LLM`, `sidp info`,
`sidp bench`, the replicas and (through `replica_ledgers`) `sidp plan` read it instead of deriving it
again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sidp.config import EngineConfig, resolve_dtype
from sidp.errors import DoesNotFit, SidpError
from sidp.memory import MemoryPlan, default_memory_per_replica, parse_bytes, plan_memory
from sidp.model.spec import ModelSpec
from sidp.pool.modes import MODES, default_mode
from sidp.pool.placement import POLICIES, Placement, parse_parts, pool_share
from sidp.pool.transport import transport_for
from sidp.runtime_memory import decoder_bytes, runtime_bytes, tokenizer_bytes

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True, slots=True)
class EngineArgs:
    model: str | Path | None = None  # None: the embedded SmolLM2
    dtype: str = "auto"
    device: str | None = None  # None: cuda when torch sees a GPU, else cpu
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    memory_per_replica: int | str | None = None  # None: half the RAM (CPU), or GPU memory x utilization
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    block_size: int = 16
    data_parallel_size: int = 1
    weight_sharing: str = "none"  # or "sidp"
    sidp_mode: str | None = None  # None: map where the device computes on a peer's memory, else auto
    placement: str = "round_robin"
    cache_slots: int = 2
    pooled_parts: str = "mlp"
    mode_probe_every: int = 0
    # A lone replica runs in the driver's process unless this asks for one of its own (as `sidp bench`
    # does, so that what the replica holds is measured apart from the bench, like vLLM's engine core).
    replica_process: bool = False

    def resolve(self, spec: ModelSpec, hf_config: dict) -> GroupPlan:
        """The group plan for a model already read (its spec and config.json); raises SidpError
        (DoesNotFit for a budget too small) with what to change."""
        self._check()
        device = self._device()
        dtype = resolve_dtype(self.dtype, hf_config)
        pooled = self.weight_sharing == "sidp" and self.data_parallel_size > 1
        if pooled and device != "cpu":
            raise SidpError(
                "SiDP on CUDA needs a CUDA transport (IPC-shared weights, WaS slots, CaS buffers), which "
                "sidp does not have yet: run plain data parallelism there (weight_sharing='none')."
            )
        mode = self.sidp_mode or (default_mode(transport_for(device)) if pooled else "auto")
        layout = Placement.build(spec.num_layers, self.data_parallel_size, self.placement) if pooled else None
        plans, plain = replica_ledgers(
            spec,
            dtype,
            self._budget(device),
            (self.block_size, self.max_num_batched_tokens, self.max_num_seqs),
            self.data_parallel_size,
            layout,
            parse_parts(self.pooled_parts),
            mode,
            self.cache_slots,
            device,
            self.max_model_len,
            runtime_bytes(device),
            # in the driver's process, a replica decodes stop strings with the driver's tokenizer
            0 if self.in_driver else decoder_bytes(str(self.model), device),
            tokenizer_bytes(str(self.model), device) if self.in_driver else 0,
        )
        tightest = min(plans, key=lambda p: p.kv_tokens)
        config = EngineConfig(
            model=Path(self.model),
            dtype=dtype,
            max_model_len=_max_model_len(self.max_model_len, spec, tightest.kv_tokens),
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            memory_per_replica=tightest.budget,
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            placement=layout,
            pooled_parts=parse_parts(self.pooled_parts),
            sidp_mode=mode,
            cache_slots=self.cache_slots,
            mode_probe_every=self.mode_probe_every,
            device=device,
        )
        return GroupPlan(config, spec, tuple(plans), plain)

    @property
    def in_driver(self) -> bool:
        """The replica runs in the driver's process (a lone one, unless replica_process)."""
        return self.data_parallel_size == 1 and not self.replica_process

    def _check(self) -> None:
        if self.data_parallel_size < 1:
            raise SidpError(f"data_parallel_size must be at least 1, got {self.data_parallel_size}.")
        if self.weight_sharing not in ("none", "sidp"):
            raise SidpError(
                f"weight_sharing must be 'none' (plain DP) or 'sidp', got {self.weight_sharing!r}."
            )
        if self.sidp_mode is not None and self.sidp_mode not in MODES:
            raise SidpError(f"sidp_mode must be one of {', '.join(MODES)}, got {self.sidp_mode!r}.")
        if self.cache_slots < 1:
            raise SidpError(f"cache_slots must be at least 1, got {self.cache_slots}.")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise SidpError("max_num_seqs and max_num_batched_tokens must be at least 1.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise SidpError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")

    def _device(self) -> str:
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device not in DEVICES:
            raise SidpError(f"device must be one of {', '.join(DEVICES)}, got {device!r}.")
        if device == "cuda" and not torch.cuda.is_available():
            raise SidpError("device='cuda' but torch sees no GPU (a CPU build of torch, or no driver).")
        return device

    def _budget(self, device: str) -> int:
        """Bytes each replica may hold."""
        if self.memory_per_replica is not None:
            return parse_bytes(self.memory_per_replica)
        if device == "cpu":
            return default_memory_per_replica(self.data_parallel_size)
        if self.data_parallel_size > torch.cuda.device_count():
            raise SidpError(
                f"{self.data_parallel_size} replicas on {torch.cuda.device_count()} GPU(s) share a GPU: "
                "give memory_per_replica so that each knows its part."
            )
        return int(torch.cuda.get_device_properties(0).total_memory * self.gpu_memory_utilization)


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """What a group runs with: one EngineConfig for every replica, and each replica's ledger."""

    config: EngineConfig
    spec: ModelSpec
    plans: tuple[MemoryPlan, ...]  # by replica
    plain: MemoryPlan | None  # plain DP's ledger on the same budget, beside SiDP's (None: does not fit)

    @property
    def size(self) -> int:
        return len(self.plans)

    @property
    def pooled(self) -> bool:
        return self.config.placement is not None

    @property
    def tightest(self) -> MemoryPlan:
        """The replica with the least KV room: it bounds max_model_len."""
        return min(self.plans, key=lambda p: p.kv_tokens)

    def describe(self) -> str:
        c = self.config
        if not self.pooled:
            return "plain data parallelism"
        return f"SiDP {c.sidp_mode}, pooling {','.join(sorted(c.pooled_parts))}"


def replica_ledgers(
    spec: ModelSpec,
    dtype: torch.dtype,
    budget: int,
    limits: tuple[int, int, int],
    size: int,
    layout: Placement | None,
    parts: frozenset[str],
    mode: str,
    cache_slots: int,
    device: str = "cpu",
    max_model_len: int | None = None,
    runtime: int = 0,
    decoder: int = 0,
    driver: int = 0,
) -> tuple[list[MemoryPlan], MemoryPlan | None]:
    """(each of the `size` replicas' ledgers, plain DP's on the same budget or None where it does not
    fit); layout None: plain DP.
    limits: (block_size, max_num_batched_tokens, max_num_seqs); max_model_len, runtime, decoder, driver:
    as plan_memory takes them. Raises DoesNotFit where even SiDP cannot hold the model."""
    extra = dict(device=device, max_model_len=max_model_len, runtime=runtime, decoder=decoder, driver=driver)
    try:
        plain = plan_memory(spec, dtype, budget, *limits, **extra)
    except SidpError:
        if layout is None:
            raise
        plain = None  # SiDP may hold what plain DP cannot
    if layout is None:
        return [plain] * size, plain
    shares = [pool_share(layout, rank, parts, mode, cache_slots) for rank in range(layout.size)]
    return [plan_memory(spec, dtype, budget, *limits, share=s, **extra) for s in shares], plain


def _max_model_len(requested: int | None, spec: ModelSpec, kv_tokens: int) -> int:
    limit = spec.max_position_embeddings
    if requested is None:
        return min(limit, kv_tokens)
    if requested > limit:
        raise SidpError(f"max_model_len={requested} exceeds the model's max_position_embeddings ({limit}).")
    if requested > kv_tokens:
        raise DoesNotFit(
            f"max_model_len={requested} is more than the KV cache holds ({kv_tokens} tokens): "
            "raise memory_per_replica or lower max_model_len."
        )
    return requested


# --- the command line: flags and defaults read from EngineArgs ----------------------------------------

FLAG_HELP = {
    "model": "checkpoint folder or .gguf (default: embedded SmolLM2)",
    "dtype": "auto, float32, bfloat16, float16",
    "device": "cpu or cuda (default: cuda when torch sees a GPU)",
    "memory_per_replica": "bytes or a size like 2GiB (default: half the RAM on CPU; on GPU, its memory x "
    "--gpu-memory-utilization)",
    "gpu_memory_utilization": "share of a GPU's memory a replica may use when --memory-per-replica is unset",
    "data_parallel_size": "replicas",
    "weight_sharing": "none (plain DP) or sidp",
    "sidp_mode": "how a replica reaches layers it does not own: copy the weights (was), send the "
    "activations (cas), choose between those per step (auto), or compute on the owner's memory in place "
    "(map; the default where the device allows it, as on CPU; else auto)",
    "placement": "who owns which layer: " + ", ".join(POLICIES),
    "cache_slots": "WaS weight cache slots per replica",
    "pooled_parts": "what SiDP pools, comma-separated: mlp, attn, embed",
}
FLAG_TYPES = {"max_model_len": int, "data_parallel_size": int}  # fields whose default is None
CHOICES = {"device": DEVICES, "weight_sharing": ("none", "sidp"), "sidp_mode": MODES, "placement": POLICIES}
POOL_FIELDS = ("pooled_parts", "placement")  # what `sidp info` also takes
NOT_FLAGS = ("mode_probe_every", "block_size", "replica_process")  # bench sets the first and last


def add_engine_arguments(parser: argparse.ArgumentParser, dtype: str = "auto", dp: int | None = 1) -> None:
    """Every EngineArgs field as a flag with its default. dp: the default replica count; None: one per
    device (see group_size); then --weight-sharing defaults to sidp with more than one replica."""
    for f in dataclasses.fields(EngineArgs):
        if f.name in NOT_FLAGS or f.name in POOL_FIELDS:
            continue
        default = {"dtype": dtype, "data_parallel_size": dp, "weight_sharing": None}.get(f.name, f.default)
        _add_flag(parser, f, default)
    add_pool_arguments(parser)


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """What SiDP pools and who owns it: shared with `sidp info`."""
    for f in dataclasses.fields(EngineArgs):
        if f.name in POOL_FIELDS:
            _add_flag(parser, f, f.default)


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, default) -> None:
    if f.name == "enable_prefix_caching":
        parser.add_argument("--no-prefix-caching", dest=f.name, action="store_false")
        return
    names, dest = ["--" + f.name.replace("_", "-")], f.name
    if f.name == "data_parallel_size":  # --dp, as `sidp info` and `sidp plan` spell it too
        names, dest = ["--dp", *names], "dp"
    help_text = FLAG_HELP.get(f.name, "")
    if default is not None:
        help_text = f"{help_text} ({default})".strip()
    kind = FLAG_TYPES.get(f.name, type(f.default) if isinstance(f.default, int | float) else None)
    parser.add_argument(
        *names, dest=dest, type=kind, default=default, choices=CHOICES.get(f.name), help=help_text or None
    )


def engine_args_from(args: argparse.Namespace, **overrides) -> EngineArgs:
    """The EngineArgs the parsed flags describe; `overrides` replace single fields (bench configurations)."""
    dp, sharing = group_size(args)
    fields = dataclasses.fields(EngineArgs)
    values = {f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}
    values.update(data_parallel_size=dp, weight_sharing=sharing)
    values["mode_probe_every"] = getattr(args, "probe_every", 0)
    return EngineArgs(**{**values, **overrides})


def llm_from_args(args: argparse.Namespace, **overrides):
    """The LLM the options describe."""
    from sidp.llm import LLM

    return LLM.from_engine_args(engine_args_from(args, **overrides))


def group_size(args: argparse.Namespace) -> tuple[int, str]:
    """(replicas, weight sharing): --dp, else one replica per device (a CPU of 2 or more cores counts
    as 2 devices, one core each); SiDP whenever there is more than one replica, unless told otherwise."""
    dp = args.dp
    if dp is None:
        dp = 2 if len(os.sched_getaffinity(0)) >= 2 else 1
    return dp, args.weight_sharing or ("sidp" if dp > 1 else "none")
