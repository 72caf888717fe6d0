"""Engine outputs as plain tuples for the pipe between the engine process and its server.

Plain tuples, lists and strings pickle and unpickle several times faster than dataclasses (no
class lookups, no per-object `__reduce__`), and the prompt travels only with a request's first
output: the receiving side keeps it for the request's later ones.
"""

from __future__ import annotations

from pagedserve.outputs import CompletionOutput, RequestOutput


def encode_output(out: RequestOutput, with_prompt: bool) -> tuple:
    completions = [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs,
                    c.finish_reason, c.stop_reason) for c in out.outputs]
    prompt = (out.prompt, out.prompt_token_ids) if with_prompt else None
    return out.request_id, prompt, completions, out.finished, out.num_cached_tokens


def decode_output(wire: tuple, prompt: tuple[str | None, list[int]]) -> RequestOutput:
    """Rebuild a `RequestOutput`; `prompt` is the `(text, token ids)` of the request's first."""
    request_id, _, completions, finished, num_cached_tokens = wire
    outputs = [CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs,
                                finish_reason, stop_reason)
               for index, text, token_ids, cumulative_logprob, logprobs, finish_reason,
               stop_reason in completions]
    return RequestOutput(request_id, prompt[0], prompt[1], outputs, finished, num_cached_tokens)
