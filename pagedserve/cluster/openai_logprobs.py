"""The engine's per-token `{token_id: logprob}` dicts in OpenAI's two logprobs shapes.

Token strings are each token decoded alone (special tokens kept), as vLLM reports them; a token
that is only part of a multi-byte character therefore shows as U+FFFD, and its `bytes` are those
of that replacement text rather than the raw byte. JSON has no -inf, so -inf (and NaN) become
-9999.0, vLLM's convention.
"""

from __future__ import annotations

import math

MIN_LOGPROB = -9999.0


class TokenTexts:
    """Decodes single token ids with a cache: a stream asks for the same ids again and again."""

    def __init__(self, tokenizer) -> None:
        if tokenizer is None:
            raise ValueError("logprobs need a tokenizer to name the tokens")
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
            self._cache[token_id] = text
        return text


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def _ranked(alternatives: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(alternatives.items(), key=lambda item: item[1], reverse=True)


def chat_logprobs_content(token_ids: list[int], logprobs: list[dict[int, float]],
                          texts: TokenTexts, top_logprobs: int) -> list[dict]:
    """Chat's `logprobs.content` entries: one per token, each with its `top_logprobs` best."""
    content = []
    for token_id, alternatives in zip(token_ids, logprobs, strict=True):
        entry = _chat_token(texts(token_id), alternatives[token_id])
        entry["top_logprobs"] = [_chat_token(texts(t), lp)
                                 for t, lp in _ranked(alternatives)[:top_logprobs]]
        content.append(entry)
    return content


def _chat_token(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": finite(logprob), "bytes": list(token.encode("utf-8"))}


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]],
                        texts: TokenTexts, top_logprobs: int, text_offset: int) -> dict:
    """Completions' `{tokens, token_logprobs, top_logprobs, text_offset}` for these tokens.

    `text_offset` of the first token is the given one (the length of the text before it in this
    completion); each `top_logprobs` dict holds the `top_logprobs` best tokens and the sampled
    one, so it may have `top_logprobs + 1` entries, as OpenAI documents.
    """
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}
    for token_id, alternatives in zip(token_ids, logprobs, strict=True):
        token = texts(token_id)
        result["tokens"].append(token)
        result["token_logprobs"].append(finite(alternatives[token_id]))
        top: dict[str, float] = {}
        for alt_id, logprob in _ranked(alternatives)[:top_logprobs]:
            top.setdefault(texts(alt_id), finite(logprob))  # two ids may decode alike
        top.setdefault(token, finite(alternatives[token_id]))
        result["top_logprobs"].append(top)
        result["text_offset"].append(text_offset)
        text_offset += len(token)
    return result
