"""A request: one prompt, `n` sequences, their detokenizers and the stop rules."""

from __future__ import annotations

from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.replicas.engine.detokenizer import IncrementalDetokenizer
from pagedserve.replicas.engine.sequence import Sequence
from pagedserve.sampling_params import SamplingParams


class Request:
    """Everything the engine tracks for one request id."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, block_size: int, tokenizer, max_model_len: int) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.max_output_tokens = min(params.max_tokens or max_model_len, max_model_len - len(prompt_token_ids))
        self.seqs = [Sequence(request_id, i, prompt_token_ids, params, block_size) for i in range(params.n)]
        for seq in self.seqs[1:]:
            seq.leader = self.seqs[0]
        self.detokenizers = [
            IncrementalDetokenizer(
                tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
            )
            for _ in self.seqs
        ]

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def on_token(self, seq: Sequence, token_id: int, eos_ids: list[int]) -> str | None:
        """Record a sampled token; return the finish reason if `seq` is now done."""
        seq.append_token(token_id)
        detok = self.detokenizers[seq.index]
        if self._is_stop_token(seq, token_id, eos_ids):
            detok.finish()
            seq.stop_reason = token_id if token_id in self.params.stop_token_ids else None
            return "stop"
        stop_string = detok.update([token_id])
        if stop_string is not None:
            seq.stop_reason = stop_string
            return "stop"
        if seq.num_output_tokens >= self.max_output_tokens:
            detok.finish()
            return "length"
        return None

    def abort(self) -> None:
        for seq, detok in zip(self.seqs, self.detokenizers, strict=True):
            if not seq.is_finished:
                seq.finish_reason = "abort"
                detok.finish()

    def output(self) -> RequestOutput:
        completions = [self._completion(seq) for seq in self.seqs]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=self.finished,
            num_cached_tokens=self.seqs[0].num_cached_tokens,
        )

    def _completion(self, seq: Sequence) -> CompletionOutput:
        want_logprobs = self.params.logprobs is not None
        return CompletionOutput(
            index=seq.index,
            text=self.detokenizers[seq.index].text,
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if want_logprobs else None,
            logprobs=list(seq.logprobs) if want_logprobs else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    def _is_stop_token(self, seq: Sequence, token_id: int, eos_ids: list[int]) -> bool:
        if seq.num_output_tokens < self.params.min_tokens:
            return False
        if token_id in self.params.stop_token_ids:
            return True
        return not self.params.ignore_eos and token_id in eos_ids
