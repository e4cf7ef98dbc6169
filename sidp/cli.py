"""The `sidp` command: generate (the default job, prompts, or a batch file), merge, info, bench, plan.

A mistake the user can fix ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
from importlib import resources
from pathlib import Path

from sidp.engine_args import add_engine_arguments, add_pool_arguments, llm_from_args
from sidp.errors import SidpError
from sidp.pool.placement import Placement, parse_parts
from sidp.signals import sigterm_interrupts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_interrupts():
            status = args.func(args)  # generate's exit status; bench and plan return their reports
        return status if isinstance(status, int) else 0
    except (SidpError, OSError) as error:
        print(f"sidp: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the group is stopped; a second Ctrl-C ends us now
        print(f"sidp: interrupted: {str(interrupt) or 'every replica is stopped'}", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidp", description="Offline LLM inference with a shared weight pool."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run prompts through a model (default: the embedded job)")
    add_engine_arguments(gen, dp=None)
    gen.add_argument(
        "--prompt", action="append", help="a prompt (repeatable); chat-templated when the model has one"
    )
    gen.add_argument("--raw", action="store_true", help="send --prompt text as is, without the chat template")
    gen.add_argument(
        "--input",
        type=Path,
        help="JSONL: OpenAI Batch lines {custom_id, method, url, body}, or {id, prompt | messages, "
        "sampling fields}",
    )
    gen.add_argument(
        "--output",
        type=Path,
        help="append results here as they finish (a rerun skips ids already there); bad lines go to "
        "OUTPUT's stem + .errors.jsonl",
    )
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--strict", action="store_true", help="stop at the first bad line, before any work")
    gen.add_argument("--fsync", action="store_true", help="make each result durable on disk as it is written")
    gen.add_argument("--num-nodes", type=int, help="nodes sharing the input (default: torchrun's, else 1)")
    gen.add_argument("--node-rank", type=int, help="this node's rank (default: torchrun's, else 0)")
    gen.set_defaults(func=cmd_generate)

    merge = sub.add_parser("merge", help="join the output parts that the nodes of a job wrote")
    merge.add_argument("output", type=Path, help="the --output every node was given")
    merge.set_defaults(func=cmd_merge)

    info = sub.add_parser("info", help="architecture, parameters and bytes by part of a model")
    info.add_argument("model", nargs="?", help="checkpoint folder or .gguf (default: the embedded model)")
    info.add_argument("--dtype", default="bfloat16")
    info.add_argument(
        "--dp", type=int, default=1, help="also show who owns what in a SiDP group of this size"
    )
    add_pool_arguments(info)
    info.set_defaults(func=cmd_info)

    from sidp.bench import throughput

    bench = sub.add_parser("bench", help="offline throughput on a synthetic workload, beside transformers")
    throughput.add_arguments(bench)
    bench.set_defaults(func=throughput.run)

    from sidp.plan import report

    plan = sub.add_parser("plan", help="KV capacity and throughput of DP and SiDP on GPU nodes, predicted")
    report.add_arguments(plan)
    plan.set_defaults(func=report.run)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from sidp.batch.job import errors_path, parse_requests, read_lines, run_job
    from sidp.batch.output import OutputFile
    from sidp.batch.shard import node_of, part_path

    if args.input is not None and args.prompt:
        raise SidpError("Give --prompt or --input, not both.")
    if args.input is not None:
        raw, source = read_lines(args.input), str(args.input)
    elif args.prompt:
        raw, source = [json.dumps(r).encode() for r in _prompt_records(args)], "--prompt"
    else:
        raw = resources.files("sidp").joinpath("data/prompts.jsonl").read_bytes().split(b"\n")
        source = "the embedded prompts"
    good, errors = parse_requests(raw, source, args.strict)  # a bad file fails before the model loads
    output = args.output
    num_nodes, node_rank = _nodes(args)
    if num_nodes > 1:  # this node's share: ids by stable hash, bad lines by number
        if output is None:
            raise SidpError("A job on several nodes needs --output: each node writes its own part.")
        good = [(n, r) for n, r in good if node_of(r.id, num_nodes) == node_rank]
        errors = [e for e in errors if e["line"] % num_nodes == node_rank]
        output = part_path(output, node_rank, num_nodes)
    if output is not None:  # refused now, before the model loads, if another run holds it
        _check_writable(errors_path(output))
        output = OutputFile(output, args.fsync)
    try:
        llm = llm_from_args(args)
        defaults = dict(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
        )
        show = not args.quiet and sys.stderr.isatty()
        summary, results = run_job(llm, good, errors, source, output, defaults, args.strict, show)
    finally:
        if output is not None:
            output.close()
    if output is None:
        for request, out in results:
            question = request.messages[-1]["content"] if request.messages else request.prompt
            print(f"### {question}\n{out.outputs[0].text.strip()}\n")
    for line in [*summary.lines(), *_group_lines(llm)]:
        print(line, file=sys.stderr)
    for error in summary.errors[:5]:
        print(f"  line {error['line']}: {error['error']}", file=sys.stderr)
    if summary.failed and output is not None:
        print(f"  (all failures in {errors_path(output.path)})", file=sys.stderr)
    return 1 if summary.failed else 0


def _nodes(args: argparse.Namespace) -> tuple[int, int]:
    from sidp.batch.shard import check_nodes, nodes_from_env

    env_nodes, env_rank = nodes_from_env()
    num_nodes = args.num_nodes if args.num_nodes is not None else env_nodes
    node_rank = args.node_rank if args.node_rank is not None else env_rank
    check_nodes(num_nodes, node_rank)
    return num_nodes, node_rank


def cmd_merge(args: argparse.Namespace) -> None:
    from sidp.batch.shard import merge

    results, parts = merge(args.output)
    print(f"merged {results} results from {parts} parts into {args.output}")


def _group_lines(llm) -> list[str]:
    """KV room and, for a SiDP group, how its replicas reached the layers they borrow."""
    from sidp.bench.modes import totals

    kv = ", ".join(f"{plan.kv_tokens:,}" for plan in llm.plans)
    lines = [f"KV cache tokens per replica: {kv}"]
    c = totals([], llm.replica_counters())
    if c["steps"]:
        lines.append(
            f"steps: {c['steps']:,} ({c['steps_was']} WaS, {c['steps_cas']} CaS, {c['steps_map']} map), "
            f"preemptions {c['preemptions']}, CaS requests {c['cas_sent']:,}, "
            f"WaS {c['was_bytes_fetched'] / 1e9:.2f} GB"
        )
    return lines


def _prompt_records(args: argparse.Namespace) -> list[dict]:
    """--prompt texts as plain lines: chat messages unless --raw."""
    key = "prompt" if args.raw else "messages"
    return [
        {"id": f"prompt-{i}", key: p if args.raw else [{"role": "user", "content": p}]}
        for i, p in enumerate(args.prompt)
    ]


def _check_writable(path: Path) -> None:
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        raise SidpError(f"Cannot write --output {path}: {error.strerror}.") from None


def cmd_info(args: argparse.Namespace) -> None:
    from sidp.config import resolve_dtype
    from sidp.memory import format_bytes, weight_bytes
    from sidp.model.checkpoint import read_config
    from sidp.model.spec import ModelSpec

    if args.model is None:
        from sidp.model.default_model import default_model_path

        args.model = default_model_path()
    config = read_config(args.model)
    spec = ModelSpec.from_hf_config(config)
    dtype = resolve_dtype(args.dtype, config)
    parts = weight_bytes(spec, dtype.itemsize)
    total = sum(parts.values())
    print(f"model            {args.model}")
    print(f"architecture     {spec.family} ({', '.join(config.get('architectures') or [])})")
    print(f"layers           {spec.num_layers}, hidden {spec.hidden_size}, ffn {spec.intermediate_size}")
    print(f"attention        {spec.num_heads} heads, {spec.num_kv_heads} KV heads, head_dim {spec.head_dim}")
    print(
        f"vocabulary       {spec.vocab_size} ({'tied' if spec.tie_word_embeddings else 'untied'} embeddings)"
    )
    print(f"context          {spec.max_position_embeddings} positions, rope theta {spec.rope_theta:g}")
    print(f"parameters       {total // dtype.itemsize:,}")
    print(f"bytes ({str(dtype).removeprefix('torch.')}):")
    for part, n in parts.items():
        print(f"  {part:<12} {format_bytes(n):>12}  {100 * n / total:5.1f}%")
    print(f"  {'total':<12} {format_bytes(total):>12}")
    print(f"KV cache         {format_bytes(spec.kv_bytes_per_token(dtype.itemsize))} per token")
    if args.dp > 1:
        pooled = parse_parts(args.pooled_parts)
        print_placement(spec, dtype, total, Placement.build(spec.num_layers, args.dp, args.placement), pooled)


def print_placement(spec, dtype, plain_total: int, placement, pooled: frozenset[str]) -> None:
    """Per replica: what it owns and the weight bytes it holds (owned + replicated; no cache slots)."""
    from sidp.memory import format_bytes, pooled_weights
    from sidp.pool.placement import pool_share

    print(f"SiDP group of {placement.size}, pooling {', '.join(sorted(pooled))}; weights each replica holds:")
    for rank in range(placement.size):
        owned = placement.owned_by(rank)
        share = pool_share(placement, rank, pooled, "was", 0)
        held = sum(pooled_weights(spec, dtype, share).values())
        extra = " + embedding" if "embed" in pooled and share.holds_embedding else ""
        print(
            f"  replica {rank}: owns layers {_ranges(owned) + extra:<28} {format_bytes(held):>12}"
            f"  (plain DP: {format_bytes(plain_total)})"
        )


def _ranges(layers: list[int]) -> str:
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def run() -> None:
    """The `sidp` command. Before the interpreter exits, the collector is told to leave every object
    alone: its last passes over torch's and transformers' objects took 0.5-0.8 s of each command, and
    free nothing that matters at exit (files are closed, replicas stopped; atexit handlers still run)."""
    status = main()
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    run()
