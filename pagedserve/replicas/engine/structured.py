"""Constrained decoding: each structured sequence's grammar masks its logits every step.

xgrammar (the library vLLM and SGLang use) compiles a JSON schema, any-JSON, a regex or a
choice into a grammar over this tokenizer's vocabulary, cached by spec; a matcher per sequence
follows the tokens sampled so far and fills a bitmask of the tokens allowed next. Imported on
the first structured request, so an engine that never sees one never loads it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING

from pagedserve.sampling_params import StructuredOutput

if TYPE_CHECKING:
    import torch

COMPILE_THREADS = 1


class Grammars:
    """Compiles grammars for one tokenizer and applies sequences' matchers to logits."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=COMPILE_THREADS)
        self._compile = lru_cache(maxsize=256)(self._compile_uncached)

    def matcher(self, spec: StructuredOutput):
        """A new matcher at the grammar's start; ValueError naming the problem if `spec` does
        not compile (an unsupported schema keyword, a bad regex)."""
        return self._xgr.GrammarMatcher(self._compile(spec))

    def _compile_uncached(self, spec: StructuredOutput):
        try:
            if spec.json_object:
                return self._compiler.compile_builtin_json_grammar()
            if spec.json_schema is not None:
                return self._compiler.compile_json_schema(
                    spec.json_schema, any_whitespace=False, strict_mode=spec.strict)
            if spec.regex is not None:
                return self._compiler.compile_regex(spec.regex)
            return self._compiler.compile_grammar(_choice_grammar(spec.choice))
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"structured output does not compile: {err}") from None

    def mask(self, logits: torch.Tensor, matchers: list) -> None:
        """Set to -inf, in place, every logit a row's matcher does not allow (None: no grammar)."""
        rows = [row for row, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        bitmask = self._xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for row in rows:
            matchers[row].fill_next_token_bitmask(bitmask, row)
        # plain torch ops on a GPU: the library's default there compiles a kernel at first use
        backend = "cpu" if logits.device.type == "cpu" else "torch_native"
        self._xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=self.vocab_size,
            indices=rows, backend=backend)


def accept(matcher, token_id: int) -> bool:
    """Advance `matcher` by a sampled token; True when its grammar is now complete (terminated,
    or the token was not allowed, which the mask rules out but a stop token may follow)."""
    if not matcher.accept_token(token_id):
        return True
    return matcher.is_terminated()


def _choice_grammar(choice: tuple[str, ...]) -> str:
    """EBNF whose only sentences are the choices (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choice)


def schema_text(schema: dict | str) -> str:
    """A JSON schema as the text `StructuredOutput.json_schema` holds."""
    return schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
