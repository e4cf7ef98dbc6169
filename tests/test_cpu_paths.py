"""Each CPU path (AMX, AVX512-BF16, AVX-512, AVX2), forced with SIDP_CPU_ISA, runs the model exactly.

Every path this CPU can run is forced in turn; a path it lacks is refused with a message, and its test
is skipped with that reason (CI machines differ: the paths above this CPU's best run elsewhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import hf_greedy, random_prompts

from sidp.errors import SidpError
from sidp.model import cpu_kernels

RUN = """
import json, sys, torch
from sidp import LLM, SamplingParams
from sidp.runtime_memory import runtime_bytes, tokenizer_bytes
path, prompts = sys.argv[1], json.loads(sys.argv[2])
params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
out = {"onednn_cap": __import__("os").environ.get("ONEDNN_MAX_CPU_ISA")}
for dtype in ("float32", "bfloat16"):
    # The replica runs in this process, beside the driver's tokenizer: both are counted.
    budget = runtime_bytes("cpu") + tokenizer_bytes(path, "cpu") + 64 * 2**20
    llm = LLM(path, dtype=dtype, memory_per_replica=budget)
    out[dtype] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    out[dtype + "_computes_in"] = str(llm.engine.runner.model.compute_dtype)
print(json.dumps(out))
"""


def run_forced(path: str, model, prompts) -> dict:
    env = {**os.environ, "SIDP_CPU_ISA": path}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(model), json.dumps(prompts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("path", ["amx", "avx512_bf16", "avx512", "avx2"])
def test_forced_path_runs_the_model_exactly(tiny_model, monkeypatch, path):
    monkeypatch.setenv("SIDP_CPU_ISA", path)
    try:
        cpu_kernels.chosen_path()
    except SidpError as refused:
        pytest.skip(str(refused))
    model = tiny_model("qwen3")
    prompts = random_prompts([5, 40, 17])
    got = run_forced(path, model, prompts)
    assert got["onednn_cap"] == cpu_kernels.PATHS[path][2]
    assert got["float32"] == hf_greedy(model, prompts, 8)
    # bf16 is multiplied in hardware only on the paths that have bf16 instructions; elsewhere widened.
    bf16_native = path in ("amx", "avx512_bf16")
    assert got["bfloat16_computes_in"] == ("torch.bfloat16" if bf16_native else "torch.float32")
    assert all(len(ids) == 8 for ids in got["bfloat16"])


def test_best_path_is_chosen_unless_forced(monkeypatch):
    monkeypatch.delenv("SIDP_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"})
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    assert cpu_kernels.supported_paths() == ["avx512", "avx2"]
    assert cpu_kernels.chosen_path() == "avx512"
    monkeypatch.setenv("SIDP_CPU_ISA", "avx2")
    assert cpu_kernels.chosen_path() == "avx2"


def test_a_path_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("SIDP_CPU_ISA", "amx")
    with pytest.raises(
        SidpError, match="SIDP_CPU_ISA=amx: this CPU lacks amx_bf16, amx_tile, avx512_bf16; it runs avx2"
    ):
        cpu_kernels.chosen_path()
    monkeypatch.setenv("SIDP_CPU_ISA", "sse9")
    with pytest.raises(SidpError, match="not a CPU path"):
        cpu_kernels.chosen_path()


def test_importing_sidp_bounds_onednns_primitive_cache_unless_the_user_did():
    show = "import os, sidp; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"

    def capacity(env: dict[str, str]) -> str:
        done = subprocess.run(
            [sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    assert capacity(env) == cpu_kernels.ONEDNN_PRIMITIVES
    assert capacity({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}) == "512"
