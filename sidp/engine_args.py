"""The engine's command-line options, shared by `sidp generate` and `sidp bench`, and the LLM they build."""

from __future__ import annotations

import argparse
import os

from sidp.pool.modes import MODES
from sidp.pool.placement import POLICIES


def add_engine_arguments(parser: argparse.ArgumentParser, dtype: str = "auto", dp: int | None = 1) -> None:
    """dp: the default replica count; None: one per device (see group_size)."""
    parser.add_argument("--model", help="checkpoint folder or .gguf (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default=dtype, help=f"auto, float32, bfloat16, float16 ({dtype})")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--memory-per-replica", help="bytes or a size like 2GiB (default: half the RAM)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument(
        "--dp",
        "--data-parallel-size",
        dest="dp",
        type=int,
        default=dp,
        help=f"replicas (default: {dp if dp else 'one per device; on a CPU with 2 or more cores, 2'})",
    )
    parser.add_argument(
        "--weight-sharing", choices=("none", "sidp"), help="default: sidp with more than one replica"
    )
    parser.add_argument(
        "--sidp-mode",
        choices=MODES,
        help="how a replica reaches layers it does not own: copy the weights (was), send the activations "
        "(cas), choose between those per step (auto), or compute on the owner's memory in place (map; "
        "the default where the device allows it, as on CPU; else auto)",
    )
    add_pool_arguments(parser)
    parser.add_argument("--cache-slots", type=int, default=2, help="WaS weight cache slots per replica")


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """What SiDP pools and who owns it: shared with `sidp info`."""
    parser.add_argument(
        "--pooled-parts", default="mlp", help="what SiDP pools, comma-separated: mlp, attn, embed (mlp)"
    )
    parser.add_argument("--placement", choices=POLICIES, default="round_robin")


def llm_from_args(args: argparse.Namespace, **overrides):
    """The LLM the options describe; `overrides` replace single LLM arguments (bench configurations)."""
    from sidp.llm import LLM

    dp, sharing = group_size(args)
    kwargs = dict(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        memory_per_replica=args.memory_per_replica,
        enable_prefix_caching=not args.no_prefix_caching,
        data_parallel_size=dp,
        weight_sharing=sharing,
        sidp_mode=args.sidp_mode,
        placement=args.placement,
        cache_slots=args.cache_slots,
        pooled_parts=args.pooled_parts,
        mode_probe_every=getattr(args, "probe_every", 0),
    )
    return LLM(**{**kwargs, **overrides})


def group_size(args: argparse.Namespace) -> tuple[int, str]:
    """(replicas, weight sharing): --dp, else one replica per device (a CPU of 2 or more cores counts
    as 2 devices, one core each); SiDP whenever there is more than one replica, unless told otherwise."""
    dp = args.dp
    if dp is None:
        dp = 2 if len(os.sched_getaffinity(0)) >= 2 else 1
    return dp, args.weight_sharing or ("sidp" if dp > 1 else "none")
