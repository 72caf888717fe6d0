"""Incremental detokenization: UTF-8-safe streaming text and stop strings."""

from __future__ import annotations

from typing import Any

# What a decode shows for a UTF-8 character whose bytes are not all there yet.
_INCOMPLETE = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first output tokens, as vLLM does


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, one step at a time.

    Each new id costs two decodes of a short trailing window of ids (vLLM's `prefix_offset` /
    `read_offset` scheme), never a decode of the whole output. The window starts in the
    prompt's last few tokens, so a leading space or a word continuation comes out as in context.

    `text` only ever grows by appending. Two kinds of text are held back from it:
    - a tail that ends in an incomplete UTF-8 character (U+FFFD, which a later token may complete);
    - a tail that could still grow into a stop string, so a stream never shows part of one.
    `finish()` releases both. When a stop string appears, `update` returns it and `text` ends
    right before it (right after it with `include_stop_str_in_output`). If several appear in one
    step, the one that is complete first in the text wins; on a tie, the one that starts first.

    For byte-level BPE tokenizers the final `text` (without a stop) equals
    `tokenizer.decode(output_ids, skip_special_tokens=...)`. Known differences elsewhere: windows
    are decoded without `clean_up_tokenization_spaces` (transformers applies it only to non-BPE
    tokenizers, such as WordPiece, whose decode then drops spaces before punctuation), and
    sentencepiece tokenizers keep the leading space of the first output word, which their
    decode of the output alone strips.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        stops = list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop: every stop string must be a non-empty str, got {stops!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stops
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched_stop: str | None = None
        self.finished = False
        self._max_stop_len = max(map(len, stops), default=0)
        self._stop_tails = StopTails(stops)
        self._ids = self._context(list(prompt_token_ids[-_CONTEXT_TOKENS:]))
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._num_output_tokens = 0
        # Every complete character decoded so far, held-back stop prefix included.
        self._decoded = ""
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_tokens

    def update(self, new_token_ids: list[int]) -> str | None:
        """Feed the newly generated ids; returns the stop string matched (generation must end), else None."""
        if self.finished:
            raise RuntimeError("update() called after the detokenizer finished")
        old_len = len(self._decoded)
        for token_id in new_token_ids:
            self._ids.append(token_id)
            self._decoded += self._read(force=False)
        self._num_output_tokens += len(new_token_ids)
        return self._publish(old_len)

    def extend(self, new_token_ids: list[int]) -> None:
        """Feed many ids at once when there are no stop strings: one decode pair for all of them.

        The text comes out as `update` would give it; only its step-by-step growth is coarser.
        """
        if self.stop:
            raise RuntimeError("extend() skips stop-string checks; use update() with stop strings")
        if self.finished:
            raise RuntimeError("extend() called after the detokenizer finished")
        old_len = len(self._decoded)
        self._ids.extend(new_token_ids)
        self._decoded += self._read(force=False)
        self._num_output_tokens += len(new_token_ids)
        self._publish(old_len)

    def finish(self) -> None:
        """End without a stop string (EOS, length, abort): release all held-back text."""
        if self.finished:
            return
        old_len = len(self._decoded)
        self._decoded += self._read(force=True)
        if self._publish(old_len) is None:
            self._text += self._decoded[len(self._text) :]
        self.finished = True

    def _context(self, prompt_tail: list[int]) -> list[int]:
        # A prompt ending mid-character would glue its bytes to the output's first character.
        return [] if self._decode(prompt_tail).endswith(_INCOMPLETE) else prompt_tail

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _read(self, *, force: bool) -> str:
        """Text the ids after `read_offset` add, or "" while they end inside a character."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if not force and (len(new_text) <= len(prefix_text) or new_text.endswith(_INCOMPLETE)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _publish(self, old_len: int) -> str | None:
        """Look for a stop string in the new text, then extend `text` as far as is safe."""
        match = self._find_stop(max(0, old_len - self._max_stop_len + 1)) if self.stop else None
        if match is not None:
            start, stop = match
            end = start + len(stop) if self.include_stop_str_in_output else start
            self._text += self._decoded[len(self._text) : end]
            self.matched_stop, self.finished = stop, True
            return stop
        self._text += self._decoded[len(self._text) : len(self._decoded) - self._held_len()]
        return None

    def _find_stop(self, search_from: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            start = self._decoded.find(stop, search_from)
            if start < 0:
                continue
            if best is None or (start + len(stop), start) < (best[0] + len(best[1]), best[0]):
                best = (start, stop)
        return best

    def _held_len(self) -> int:
        """Length of the longest tail of the decoded text that is a proper prefix of a stop string."""
        self._stop_tails.feed(self._decoded[self._stop_tails.seen:])
        return self._stop_tails.held_len()


class StopTails:
    """For each stop string, the longest tail of the text fed so far that is a prefix of it
    (a Knuth-Morris-Pratt state per stop string), updated one new character at a time.

    Time is linear in the new text per stop string and memory linear in the stop strings'
    length; the set of every prefix of every stop string it replaces grew quadratically (16 stop
    strings of 16,000 characters held about 0.9 GB).
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.seen = 0  # characters fed so far
        self._failure = [_failure_function(s) for s in stops]
        self._matched = [0] * len(stops)

    def feed(self, text: str) -> None:
        self.seen += len(text)
        for i, stop in enumerate(self.stops):
            k, failure, full = self._matched[i], self._failure[i], len(stop)
            for ch in text:
                if k == full:
                    k = failure[k - 1]
                while k and stop[k] != ch:
                    k = failure[k - 1]
                if stop[k] == ch:
                    k += 1
            self._matched[i] = k

    def held_len(self) -> int:
        """The longest tail that is a proper prefix of some stop string (0 for none)."""
        return max((k if k < len(s) else self._failure[i][k - 1]
                    for i, (k, s) in enumerate(zip(self._matched, self.stops, strict=True))),
                   default=0)


def _failure_function(pattern: str) -> list[int]:
    """`failure[i]`: the length of the longest proper prefix of `pattern[:i + 1]` that is also
    its suffix (Knuth-Morris-Pratt)."""
    failure = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = failure[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        failure[i] = k
    return failure
