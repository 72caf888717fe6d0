"""The engine's per-token `{token_id: logprob}` dicts in OpenAI's two logprobs shapes, and in
vLLM's `prompt_logprobs`.

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


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float] | None],
                        texts: TokenTexts, top_logprobs: int, text_offset: int) -> dict:
    """Completions' `{tokens, token_logprobs, top_logprobs, text_offset}` for these tokens.

    `text_offset` of the first token is the given one (the length of the text before it in this
    completion); each `top_logprobs` dict holds the `top_logprobs` best tokens and the sampled
    one, so it may have `top_logprobs + 1` entries, as OpenAI documents. A token without
    logprobs (an echoed prompt's first: nothing precedes it) gets null in both lists.
    """
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}
    for token_id, alternatives in zip(token_ids, logprobs, strict=True):
        token = texts(token_id)
        result["tokens"].append(token)
        result["token_logprobs"].append(
            None if alternatives is None else finite(alternatives[token_id]))
        result["top_logprobs"].append(
            None if alternatives is None else _top(token_id, alternatives, texts, top_logprobs))
        result["text_offset"].append(text_offset)
        text_offset += len(token)
    return result


def _top(token_id: int, alternatives: dict[int, float], texts: TokenTexts,
         top_logprobs: int) -> dict[str, float]:
    top: dict[str, float] = {}
    for alt_id, logprob in _ranked(alternatives)[:top_logprobs]:
        top.setdefault(texts(alt_id), finite(logprob))  # two ids may decode alike
    top.setdefault(texts(token_id), finite(alternatives[token_id]))
    return top


def vllm_prompt_logprobs(token_ids: list[int], logprobs: list[dict[int, float] | None],
                         texts: TokenTexts, top_n: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs` of a completions choice: per prompt token, None for the first,
    else `{token id: {"logprob", "rank", "decoded_token"}}` for the token and the `top_n` most
    likely (ids are strings, as JSON keys are). A rank (1: most likely) is known for the top
    `top_n`; the prompt token's is null when it is not among them."""
    result: list[dict | None] = []
    for token_id, alternatives in zip(token_ids, logprobs, strict=True):
        if alternatives is None:
            result.append(None)
            continue
        ranks = {alt: rank for rank, (alt, _) in
                 enumerate(_ranked(alternatives)[:top_n], start=1)}
        entry = {}
        for alt in (token_id, *ranks):
            entry.setdefault(str(alt), {"logprob": finite(alternatives[alt]),
                                        "rank": ranks.get(alt), "decoded_token": texts(alt)})
        result.append(entry)
    return result
