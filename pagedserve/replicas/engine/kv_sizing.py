"""Measure the largest step's memory peak, so the KV cache can take what is left."""

from __future__ import annotations

import torch

from pagedserve.replicas.models.layers import AttentionMetadata

# Profile prefill in chunks of this many tokens: the torch reference attention materialises
# [heads, q, k] scores per sequence, which for one long sequence would inflate the peak.
_PROFILE_SEQ_LEN = 256


@torch.inference_mode()
def profile_peak_bytes(runner) -> int:
    """Peak allocated bytes of a forward at `max_num_batched_tokens` plus sampling logits."""
    config, spec, device = runner.config, runner.spec, runner.device
    tokens = config.max_num_batched_tokens
    rest = tokens % _PROFILE_SEQ_LEN  # first: a one-token sequence counts as a decode row
    lens = ([rest] if rest else []) + [_PROFILE_SEQ_LEN] * (tokens // _PROFILE_SEQ_LEN)
    bs = runner.block_size
    blocks_per_seq = [-(-n // bs) for n in lens]
    kv = torch.zeros(spec.num_layers, 2, sum(blocks_per_seq), bs, runner.num_kv_heads,
                     spec.head_dim, dtype=runner.dtype, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    meta, positions = _dummy_prefill(lens, blocks_per_seq, bs, device)
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    hidden = runner.model(ids, positions, meta, kv)
    rows = torch.arange(min(config.max_num_seqs, tokens), device=device) % tokens
    logits = runner.model.compute_logits(hidden[rows])
    # The sampler's heaviest path keeps a few vocabulary-sized float32 copies alive at once.
    probs = logits.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    _ = (logits.log_softmax(dim=-1), sorted_probs.cumsum(dim=-1), order)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del kv, hidden, logits, probs, sorted_probs, order, _
    torch.cuda.empty_cache()
    return peak


def _dummy_prefill(lens: list[int], blocks_per_seq: list[int], bs: int, device: torch.device):
    tables = torch.zeros(len(lens), max(blocks_per_seq), dtype=torch.int32)
    slots, positions, start = [], [], 0
    for i, (n, nb) in enumerate(zip(lens, blocks_per_seq, strict=True)):
        tables[i, :nb] = torch.arange(start, start + nb, dtype=torch.int32)
        slots += [(start + p // bs) * bs + p % bs for p in range(n)]
        positions += range(n)
        start += nb
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=tables.to(device),
        context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=starts.to(device),
        num_decodes=sum(1 for n in lens if n == 1),
        max_query_len=max(lens),
    )
    return meta, torch.tensor(positions, device=device)
