"""A request: one prompt, `n` sequences, their detokenizers and the stop rules."""

from __future__ import annotations

from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.replicas.engine.detokenizer import IncrementalDetokenizer
from pagedserve.replicas.engine.sequence import PLACEHOLDER, Sequence
from pagedserve.replicas.engine.structured import accept
from pagedserve.sampling_params import SamplingParams


class Request:
    """Everything the engine tracks for one request id."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, block_size: int, tokenizer, max_model_len: int) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        wanted = max_model_len if params.max_tokens is None else params.max_tokens
        self.max_output_tokens = min(wanted, max_model_len - len(prompt_token_ids))
        self.seqs = [Sequence(request_id, i, prompt_token_ids, params, block_size) for i in range(params.n)]
        for seq in self.seqs:
            seq.max_len = len(prompt_token_ids) + self.max_output_tokens
        for seq in self.seqs[1:]:
            seq.leader = self.seqs[0]
        self.detokenizers = [
            IncrementalDetokenizer(
                tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
            )
            for _ in self.seqs
        ]
        # Without stop strings, text is only needed when an output is built: ids wait here and
        # are detokenized in one pass then, instead of two tokenizer calls per token per step.
        self._undecoded: list[list[int]] = [[] for _ in self.seqs]
        # Per completion, what earlier deltas carried: output tokens, characters of text, and
        # whether the finish reason went out.
        self._sent_tokens = [0] * len(self.seqs)
        self._sent_text = [0] * len(self.seqs)
        self._sent_finish = [False] * len(self.seqs)
        self._sent_prompt_logprobs = False

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def on_token(self, seq: Sequence, token_id: int, eos_ids: list[int]) -> str | None:
        """Append a sampled token; return the finish reason if `seq` is now done."""
        seq.append_token(token_id)
        return self.on_sampled(seq, len(seq) - 1, token_id, eos_ids)

    def on_sampled(self, seq: Sequence, index: int, token_id: int, eos_ids: list[int]) -> str | None:
        """Put a sampled token at `index` of `seq` (its placeholder); return the finish reason.

        When `seq` finishes here, any placeholders after `index` are dropped.
        """
        seq.token_ids[index] = token_id
        count = index + 1 - seq.num_prompt_tokens  # output tokens up to this one
        reason = self._finish_reason(seq, token_id, count, eos_ids)
        if reason is None and seq.matcher is not None and accept(seq.matcher, token_id):
            reason = self._grammar_done(seq)
        if reason is not None:
            del seq.token_ids[index + 1:]
        return reason

    def _finish_reason(self, seq: Sequence, token_id: int, count: int, eos_ids) -> str | None:
        detok = self.detokenizers[seq.index]
        if self._is_stop_token(count, token_id, eos_ids):
            self._flush(seq)
            detok.finish()
            seq.stop_reason = token_id if token_id in self.params.stop_token_ids else None
            return "stop"
        if self.params.stop:
            stop_string = detok.update([token_id])
            if stop_string is not None:
                seq.stop_reason = stop_string
                return "stop"
        else:
            self._undecoded[seq.index].append(token_id)
        if count >= self.max_output_tokens:
            self._flush(seq)
            detok.finish()
            return "length"
        return None

    def _grammar_done(self, seq: Sequence) -> str:
        """The sequence's grammar is complete (or allows nothing more): it stops here."""
        self._flush(seq)
        self.detokenizers[seq.index].finish()
        return "stop"

    def end_without_output(self, seq: Sequence) -> str:
        """`seq` may generate nothing (`max_tokens=0`) and its prompt is computed: it ends."""
        self.detokenizers[seq.index].finish()
        return "length"

    def _flush(self, seq: Sequence) -> None:
        pending = self._undecoded[seq.index]
        if pending:
            self.detokenizers[seq.index].extend(pending)
            pending.clear()

    def abort(self) -> None:
        for seq, detok in zip(self.seqs, self.detokenizers, strict=True):
            if not seq.is_finished:
                seq.finish_reason = "abort"
                seq.drop_placeholders()
                self._flush(seq)
                detok.finish()

    def delta(self) -> RequestOutput:
        """What is new since this request's previous delta (the first: everything so far).

        Per completion: the tokens sampled since (those still in flight excluded), the text
        they added, their logprobs and, once, the finish reason; a completion without news is
        left out; the prompt logprobs, once. Nothing already sent is copied again.
        """
        completions = []
        for seq in self.seqs:
            self._flush(seq)
            completion = self._completion_delta(seq)
            if completion is not None:
                completions.append(completion)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=self.finished,
            num_cached_tokens=self.seqs[0].num_cached_tokens,
            prompt_logprobs=self._prompt_logprobs_delta(),
        )

    def _prompt_logprobs_delta(self) -> list[dict[int, float] | None] | None:
        """The prompt logprobs, once: in the first delta after every prompt token is scored
        (before the first token is sampled, so in the request's first delta)."""
        scored = self.seqs[0].prompt_logprobs
        if self._sent_prompt_logprobs or scored is None or len(scored) < len(self.prompt_token_ids):
            return None
        self._sent_prompt_logprobs = True
        return scored

    def _completion_delta(self, seq: Sequence) -> CompletionOutput | None:
        i = seq.index
        sent_tokens, sent_text = self._sent_tokens[i], self._sent_text[i]
        start, end = seq.num_prompt_tokens + sent_tokens, len(seq.token_ids)
        while end > start and seq.token_ids[end - 1] == PLACEHOLDER:
            end -= 1  # sampled on the device, not known yet: it goes with a later delta
        text = self.detokenizers[i].text
        finishing = seq.finish_reason is not None and not self._sent_finish[i]
        if end == start and len(text) == sent_text and not finishing:
            return None
        self._sent_tokens[i] = end - seq.num_prompt_tokens
        self._sent_text[i] = len(text)
        self._sent_finish[i] = seq.finish_reason is not None
        want_logprobs = self.params.logprobs is not None
        return CompletionOutput(
            index=i,
            text=text[sent_text:],
            token_ids=seq.token_ids[start:end],
            cumulative_logprob=seq.cumulative_logprob if want_logprobs else None,
            logprobs=seq.logprobs[sent_tokens:self._sent_tokens[i]] if want_logprobs else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    def _is_stop_token(self, count: int, token_id: int, eos_ids: list[int]) -> bool:
        if count < self.params.min_tokens:
            return False
        if token_id in self.params.stop_token_ids:
            return True
        return not self.params.ignore_eos and token_id in eos_ids
