"""sidp: offline LLM inference whose data-parallel replicas share one pool of weights."""

from sidp.model.cpu_kernels import cap_onednn

cap_onednn()  # bounds oneDNN (its cache; with SIDP_CPU_ISA, its path) before its first product

from sidp.engine_args import EngineArgs  # noqa: E402
from sidp.errors import SidpError  # noqa: E402
from sidp.llm import LLM  # noqa: E402
from sidp.outputs import CompletionOutput, RequestOutput  # noqa: E402
from sidp.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "SidpError"]
__version__ = "0.1.0"
