"""One vLLM process of the plugin tests: a rank of a SiDP group, or vLLM alone. It generates greedily and
writes the token ids and what its worker holds to a JSON file.

    python -m tests_vllm.rank_main --model DIR --prompts P.json --max-tokens N --out OUT.json

(run from the repository root, so that vLLM's worker can import `worker_state` from this module).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

MEMFD = "/memfd:sidp-pool"  # how /proc/PID/maps names sidp's shared segments (sidp.pool.transport)


def worker_state(model) -> dict:
    """In vLLM's worker: its offloader, what sidp did, which linears keep a plain weight, and for each
    layer the shared segment (inode) its MLP weight lives in, or None where it is private memory."""
    from vllm.model_executor.offloader.base import get_offloader
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from sidp.vllm_plugin import pool_summary

    maps = Path("/proc/self/maps").read_text().splitlines()
    return {
        "offloader": type(get_offloader()).__name__,
        "additional_config": getattr(
            getattr(get_offloader(), "vllm_config", None), "additional_config", None
        ),
        "summary": pool_summary(),
        "plain_linears": sorted(
            n for n, m in model.named_modules() if getattr(m, "_cpu_skip_gemm_dispatch", False)
        ),
        "load_model_wrapped": hasattr(CPUModelRunner.load_model, "sidp_post_init"),
        "mlp_segments": [_segment(maps, layer.mlp.down_proj.weight) for layer in model.model.layers],
    }


def _segment(maps: list[str], tensor) -> int | None:
    if tensor.numel() == 0:
        return None
    address = tensor.data_ptr()
    for line in maps:
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return int(fields[4]) if len(fields) == 6 and fields[5].startswith(MEMFD) else None
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="JSON: a list of token id lists")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", required=True, help="the result's path; {rank} becomes the rank")
    args = parser.parse_args()
    out = Path(args.out.format(rank=os.environ.get("SIDP_VLLM_RANK", "0")))
    import vllm

    from tests_vllm.rank_main import worker_state  # by its module's name: vLLM sends it to the worker by name

    llm = vllm.LLM(
        model=args.model,
        dtype="float32",
        enable_prefix_caching=False,
        max_model_len=512,
        seed=0,
        enforce_eager=True,  # no torch.compile: a start-up in half the time, and the same in both runs
    )
    prompts = [{"prompt_token_ids": ids} for ids in json.loads(args.prompts.read_text())]
    params = vllm.SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "rank": os.environ.get("SIDP_VLLM_RANK"),
        "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        "worker": llm.apply_model(worker_state)[0],
    }
    out.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
