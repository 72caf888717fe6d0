"""The offline, vLLM-shaped API: `LLM(...).generate(...)` and `LLM(...).chat(...)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from pagedserve.config import EngineConfig
from pagedserve.outputs import RequestOutput
from pagedserve.replicas.engine.llm_engine import LLMEngine
from pagedserve.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Generate text from a model in this process.

    `LLM()` loads the embedded default model (SmolLM2-135M-Instruct); `LLM(path)` loads a local
    Hugging Face directory or a .gguf file. Extra keyword arguments are `EngineConfig` fields.
    With `tensor_parallel_size=N` the model is split over N ranks: this process and N-1 local
    child processes (one GPU each on CUDA, gloo on CPU); `shutdown()` stops them.
    """

    def __init__(self, model: str | None = None, *, tensor_parallel_size: int = 1,
                 dtype: str = "auto", progress: bool = True, **engine_kwargs) -> None:
        config = EngineConfig(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                              **engine_kwargs)
        self.engine = LLMEngine(config, progress=progress)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any; safe to call more than once."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs keep the input order."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for request_id, prompt, p in zip(request_ids, prompts, params, strict=True):
                self.engine.add_request(request_id, prompt, p)
            return self._run(request_ids, use_tqdm)
        finally:
            for request_id in request_ids:
                self.engine.abort(request_id)  # no-op for finished ones; frees the rest on error

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list) and generate replies."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self._render_chat(c, add_generation_prompt, chat_template_kwargs or {})
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _render_chat(self, conversation: list[Message], add_generation_prompt: bool,
                     kwargs: dict) -> list[int]:
        if not conversation or not all(isinstance(m, dict) and "role" in m for m in conversation):
            raise ValueError("a conversation must be a non-empty list of {'role', 'content'} dicts")
        tokenizer = self.engine.tokenizer
        if tokenizer.chat_template is None:
            raise ValueError(f"the model at {self.engine.model_dir} has no chat template")
        rendered = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return tokenizer.encode(rendered, add_special_tokens=False)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm) as bar:
            while len(finished) < len(request_ids):
                for out in self.engine.step(stream=False):
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[r] for r in request_ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    if not prompts:
        raise ValueError("prompts is empty")
    return prompts


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    return params
