"""pagedserve: serve LLMs on a Ray cluster with a paged-KV engine.

The offline API mirrors vLLM: `LLM`, `SamplingParams`, `RequestOutput`.
"""

from pagedserve.llm import LLM
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
