"""SiDP inside vLLM: a `vllm.general_plugins` entry point that lets vLLM's data-parallel ranks (one `LLM`
per rank process) share one pool of weights, through vLLM's weight-offloader seam.

vLLM calls `register` once in each of its processes. Without SIDP_VLLM_GROUP in the environment it
returns at once and vLLM runs as if the plugin were not installed. With it (and SIDP_VLLM_RANK,
SIDP_VLLM_SIZE), it checks the vLLM version and platform and makes the model runner load through sidp's
offloader. `python -m sidp.vllm_plugin.launch` starts the ranks of a group with those variables set;
`llm.apply_model(pool_summary)` says what the pool did in each worker.
"""

from __future__ import annotations

from sidp.vllm_plugin import settings


def register() -> None:
    if not settings.enabled():
        return
    import vllm  # loaded already: vLLM is the caller

    from sidp.vllm_plugin import compat

    compat.check_version(vllm.__version__)
    chosen = settings.from_env()
    compat.check_platform()
    compat.install(chosen)


def pool_summary(model=None) -> dict | None:
    """What sidp did in this vLLM worker (its rank, the owner of every layer, the bytes freed, ...), or
    None where the plugin is off: `llm.apply_model(pool_summary)` returns each worker's (vLLM wants
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 to send a function to its workers)."""
    from vllm.model_executor.offloader.base import get_offloader

    return getattr(get_offloader(), "summary", None)
