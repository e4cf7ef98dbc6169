"""sidp: offline LLM inference whose data-parallel replicas share one pool of weights."""

from sidp.engine_args import EngineArgs
from sidp.errors import SidpError
from sidp.llm import LLM
from sidp.outputs import CompletionOutput, RequestOutput
from sidp.sampling_params import SamplingParams

__all__ = ["LLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "SidpError"]
__version__ = "0.1.0"
