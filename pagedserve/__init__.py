"""pagedserve: serve LLMs on a Ray cluster with a paged-KV engine.

The offline API mirrors vLLM: `LLM`, `SamplingParams`, `RequestOutput`.
"""

from typing import TYPE_CHECKING

from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.llm import LLM

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `LLM` pulls in torch and transformers; the Serve actors that never run a model (ingress,
    # router, the replica's own process) import this package without paying for them.
    if name == "LLM":
        from pagedserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
