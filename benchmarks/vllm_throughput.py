"""vLLM's CPU build on the same workload as `sidp bench`, for a side-by-side figure.

Runs in a separate environment that has vLLM (it brings its own dependencies). The workload comes
from sidp's own generator, written to JSON by the command in docs/BENCHMARKS.md, so both engines
see the same token ids.

    python benchmarks/vllm_throughput.py --model DIR --workload workload.json --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="the converted SmolLM2 folder (sidp info prints it)")
    parser.add_argument(
        "--workload", type=Path, required=True, help="JSON: {timed: [[ids, n]], warmup: [...]}"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("bench-results/vllm-throughput.json"))
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    workload = json.loads(args.workload.read_text())
    llm = LLM(model=args.model, dtype=args.dtype, enable_prefix_caching=False, max_model_len=2048, seed=0)

    def run(requests):
        prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
        return llm.generate(prompts, params, use_tqdm=False)

    run(workload["warmup"])
    started = time.perf_counter()
    outputs = run(workload["timed"])
    elapsed = time.perf_counter() - started
    for out, (_, n) in zip(outputs, workload["timed"], strict=True):
        assert len(out.outputs[0].token_ids) == n, "an output of the wrong length would make the figure a lie"
    prompt_tokens = sum(len(ids) for ids, _ in workload["timed"])
    output_tokens = sum(n for _, n in workload["timed"])
    line = (
        f"Throughput: {len(outputs) / elapsed:.2f} requests/s, "
        f"{(prompt_tokens + output_tokens) / elapsed:.2f} total tokens/s, "
        f"{output_tokens / elapsed:.2f} output tokens/s"
    )
    print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    args.out.write_text(
        json.dumps(
            {
                "engine": "vllm",
                "dtype": args.dtype,
                "elapsed_s": elapsed,
                "line": line,
                "output_tokens_per_s": output_tokens / elapsed,
                "env": env,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
