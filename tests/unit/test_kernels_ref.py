"""Torch reference paged-attention kernels against naive dense causal attention in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pagedserve.kernels.attention_ref import (
    paged_decode_attention,
    paged_prefill_attention,
    store_kv,
)

HEAD_CONFIGS = [(8, 8), (8, 2), (8, 1)]  # (heads, kv_heads): GQA ratios 1, 4, 8
HEAD_DIMS = [64, 128]
BLOCK_SIZES = [8, 16]
SHAPES = list(itertools.product(HEAD_CONFIGS, HEAD_DIMS, BLOCK_SIZES))
SHAPE_IDS = [f"h{h}kv{kv}-d{d}-bs{bs}" for (h, kv), d, bs in SHAPES]

F32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=3e-2, rtol=3e-2)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[q_len, H, D]` are the last q_len positions of k/v `[ctx, KVH, D]`; float64 result."""
    q, k, v = q.double(), k.double(), v.double()
    q_len, num_heads, _ = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    positions = torch.arange(ctx - q_len, ctx)
    visible = torch.arange(ctx)[None, :] <= positions[:, None]  # [q_len, ctx]
    out = torch.empty(q_len, num_heads, q.shape[2], dtype=torch.float64)
    for h in range(num_heads):
        kh, vh = k[:, h // group], v[:, h // group]
        scores = (q[:, h] @ kh.T) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        out[:, h] = (weights / weights.sum(dim=-1, keepdim=True)) @ vh
    return out


class PagedSetup:
    """Random per-sequence K/V stored through `store_kv` into shuffled, non-contiguous blocks."""

    def __init__(self, context_lens: list[int], num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, seed: int, spare_blocks: int = 3) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        self.context_lens = context_lens
        per_seq = [-(-n // block_size) for n in context_lens]
        num_blocks = sum(per_seq) + spare_blocks
        # Unused cache rows hold large finite garbage: any leak into the result shows up.
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = (torch.randn(shape, generator=gen) * 100).to(dtype)
        self.v_cache = (torch.randn(shape, generator=gen) * 100).to(dtype)
        order = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables: list[list[int]] = []
        for n in per_seq:
            self.tables.append(order[:n])
            order = order[n:]
        self.keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
                     for n in context_lens]
        self.values = [torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
                       for n in context_lens]
        store_kv(torch.cat(self.keys), torch.cat(self.values), self.k_cache, self.v_cache,
                 torch.tensor(self.slots(), dtype=torch.long))

    def slots(self) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs
                for table, n in zip(self.tables, self.context_lens, strict=True)
                for p in range(n)]

    def block_tables(self) -> torch.Tensor:
        width = max(len(t) for t in self.tables)
        # Padding uses a valid id that belongs to another sequence, as the runner may.
        pad = self.tables[0][0]
        return torch.tensor([t + [pad] * (width - len(t)) for t in self.tables], dtype=torch.int32)


def ragged_lengths(block_size: int) -> list[int]:
    bs = block_size
    return [1, bs - 1, bs, bs + 1, 2 * bs, 3 * bs + 5, 5]


# store_kv


def test_store_kv_writes_rows_to_their_slots_and_nothing_else():
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(6, 4, 2, 8, generator=gen)
    v_cache = torch.randn(6, 4, 2, 8, generator=gen)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    key = torch.randn(5, 2, 8, generator=gen)
    value = torch.randn(5, 2, 8, generator=gen)
    slots = [22, 3, 9, 0, 17]
    store_kv(key, value, k_cache, v_cache, torch.tensor(slots))
    flat_k, flat_v = k_cache.view(24, 2, 8), v_cache.view(24, 2, 8)
    for row, slot in enumerate(slots):
        assert torch.equal(flat_k[slot], key[row])
        assert torch.equal(flat_v[slot], value[row])
    untouched = [s for s in range(24) if s not in slots]
    assert torch.equal(flat_k[untouched], k_before.view(24, 2, 8)[untouched])
    assert torch.equal(flat_v[untouched], v_before.view(24, 2, 8)[untouched])


def test_store_kv_skips_slot_minus_one():
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.zeros(3, 4, 1, 4)
    v_cache = torch.zeros(3, 4, 1, 4)
    key = torch.randn(4, 1, 4, generator=gen)
    value = torch.randn(4, 1, 4, generator=gen)
    store_kv(key, value, k_cache, v_cache, torch.tensor([5, -1, 10, -1]))
    flat_k, flat_v = k_cache.view(12, 1, 4), v_cache.view(12, 1, 4)
    assert torch.equal(flat_k[5], key[0]) and torch.equal(flat_k[10], key[2])
    assert torch.equal(flat_v[5], value[0]) and torch.equal(flat_v[10], value[2])
    written = torch.zeros(12, dtype=torch.bool)
    written[[5, 10]] = True
    assert torch.count_nonzero(flat_k[~written]) == 0
    assert torch.count_nonzero(flat_v[~written]) == 0
    # The last cache slot must not be hit by a -1 wrapping around.
    assert torch.count_nonzero(flat_k[-1]) == 0


def test_store_kv_all_slots_skipped_leaves_cache_unchanged():
    k_cache, v_cache = torch.ones(2, 4, 1, 4), torch.ones(2, 4, 1, 4)
    store_kv(torch.zeros(3, 1, 4), torch.zeros(3, 1, 4), k_cache, v_cache,
             torch.tensor([-1, -1, -1]))
    assert torch.all(k_cache == 1) and torch.all(v_cache == 1)


def test_store_kv_casts_to_cache_dtype():
    k_cache = torch.zeros(2, 4, 1, 4, dtype=torch.bfloat16)
    v_cache = torch.zeros(2, 4, 1, 4, dtype=torch.bfloat16)
    key = torch.full((1, 1, 4), 1.5)
    store_kv(key, key * 2, k_cache, v_cache, torch.tensor([6]))
    assert k_cache.dtype == torch.bfloat16
    assert torch.all(k_cache.view(8, 1, 4)[6] == 1.5)
    assert torch.all(v_cache.view(8, 1, 4)[6] == 3.0)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_store_kv_round_trip_through_shuffled_blocks(block_size):
    setup = PagedSetup(ragged_lengths(block_size), 2, 16, block_size, torch.float32, seed=2)
    for table, n, k, v in zip(setup.tables, setup.context_lens, setup.keys, setup.values,
                              strict=True):
        rows_k = setup.k_cache[table].reshape(-1, 2, 16)[:n]
        rows_v = setup.v_cache[table].reshape(-1, 2, 16)[:n]
        assert torch.equal(rows_k, k) and torch.equal(rows_v, v)


# decode


def run_decode(setup: PagedSetup, num_heads: int, head_dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dtype = setup.k_cache.dtype
    query = torch.randn(len(setup.context_lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    out = paged_decode_attention(query, setup.k_cache, setup.v_cache, setup.block_tables(),
                                 torch.tensor(setup.context_lens, dtype=torch.int32), scale)
    expected = torch.stack([
        dense_attention(query[i:i + 1], setup.keys[i], setup.values[i], scale)[0]
        for i in range(len(setup.context_lens))
    ])
    return out, expected


@pytest.mark.parametrize(("heads", "head_dim", "block_size"), SHAPES, ids=SHAPE_IDS)
def test_decode_matches_dense(heads, head_dim, block_size):
    num_heads, num_kv_heads = heads
    setup = PagedSetup(ragged_lengths(block_size), num_kv_heads, head_dim, block_size,
                       torch.float32, seed=num_heads * 7 + num_kv_heads + head_dim + block_size)
    out, expected = run_decode(setup, num_heads, head_dim, seed=3)
    assert out.shape == expected.shape
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, **F32_TOL)


def test_decode_single_sequence_one_token():
    setup = PagedSetup([1], 2, 64, 16, torch.float32, seed=4)
    out, expected = run_decode(setup, 8, 64, seed=5)
    # With one key the result is exactly that key's value row for every head of the group.
    torch.testing.assert_close(out[0, :4], setup.values[0][0, 0].expand(4, 64), **F32_TOL)
    torch.testing.assert_close(out.double(), expected, **F32_TOL)


def test_decode_long_context_many_blocks():
    setup = PagedSetup([8 * 37 + 3, 9], 2, 64, 8, torch.float32, seed=6)
    out, expected = run_decode(setup, 8, 64, seed=7)
    torch.testing.assert_close(out.double(), expected, **F32_TOL)


@pytest.mark.parametrize(("heads", "head_dim"), [((8, 2), 128), ((8, 8), 64), ((8, 1), 64)])
def test_decode_bfloat16(heads, head_dim):
    num_heads, num_kv_heads = heads
    setup = PagedSetup(ragged_lengths(16), num_kv_heads, head_dim, 16, torch.bfloat16, seed=8)
    out, expected = run_decode(setup, num_heads, head_dim, seed=9)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, **BF16_TOL)


# prefill


def prefill_cases(block_size: int) -> list[tuple[int, int]]:
    """(context_len, q_len): whole prompts, cached prefixes, chunks crossing block boundaries."""
    bs = block_size
    return [
        (bs + 3, bs + 3),          # whole prompt crossing a boundary
        (1, 1),
        (3 * bs, bs),              # prefix of two full blocks cached
        (2 * bs + 5, bs + 2),      # chunk starting mid-block
        (bs - 1, 1),               # one new token after a partial-block prefix
        (4 * bs + 1, 7),
        (2 * bs, 2 * bs),
    ]


def run_prefill(setup: PagedSetup, q_lens: list[int], num_heads: int, head_dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dtype = setup.k_cache.dtype
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    scale = 1 / math.sqrt(head_dim)
    out = paged_prefill_attention(query, setup.k_cache, setup.v_cache, setup.block_tables(),
                                  starts, torch.tensor(setup.context_lens, dtype=torch.int32),
                                  scale)
    expected = torch.cat([
        dense_attention(query[starts[i]:starts[i + 1]], setup.keys[i], setup.values[i], scale)
        for i in range(len(q_lens))
    ])
    return out, expected


@pytest.mark.parametrize(("heads", "head_dim", "block_size"), SHAPES, ids=SHAPE_IDS)
def test_prefill_matches_dense(heads, head_dim, block_size):
    num_heads, num_kv_heads = heads
    context_lens, q_lens = map(list, zip(*prefill_cases(block_size), strict=True))
    setup = PagedSetup(context_lens, num_kv_heads, head_dim, block_size, torch.float32,
                       seed=num_heads + 3 * num_kv_heads + head_dim + 11 * block_size)
    out, expected = run_prefill(setup, q_lens, num_heads, head_dim, seed=10)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, **F32_TOL)


def test_prefill_is_causal():
    """Changing a later key/value must not change earlier queries' outputs."""
    setup = PagedSetup([20], 2, 64, 8, torch.float32, seed=11)
    out, _ = run_prefill(setup, [12], 8, 64, seed=12)
    # Overwrite the last token's K/V (position 19) and recompute.
    slot = torch.tensor([setup.slots()[19]])
    store_kv(torch.randn(1, 2, 64) * 5, torch.randn(1, 2, 64) * 5, setup.k_cache,
             setup.v_cache, slot)
    out2, _ = run_prefill(setup, [12], 8, 64, seed=12)
    torch.testing.assert_close(out2[:-1], out[:-1], atol=0, rtol=0)
    assert not torch.allclose(out2[-1], out[-1])


def test_prefill_single_token_equals_decode():
    setup = PagedSetup([1, 9, 33, 16], 2, 64, 8, torch.float32, seed=13)
    gen = torch.Generator().manual_seed(14)
    query = torch.randn(4, 8, 64, generator=gen)
    context_lens = torch.tensor(setup.context_lens, dtype=torch.int32)
    scale = 0.125
    decode = paged_decode_attention(query, setup.k_cache, setup.v_cache, setup.block_tables(),
                                    context_lens, scale)
    prefill = paged_prefill_attention(query, setup.k_cache, setup.v_cache, setup.block_tables(),
                                      torch.arange(5, dtype=torch.int32), context_lens, scale)
    torch.testing.assert_close(prefill, decode, **F32_TOL)


@pytest.mark.parametrize(("heads", "head_dim", "block_size"),
                         [((8, 2), 128, 16), ((8, 1), 64, 8), ((8, 8), 64, 16)])
def test_prefill_bfloat16(heads, head_dim, block_size):
    num_heads, num_kv_heads = heads
    context_lens, q_lens = map(list, zip(*prefill_cases(block_size), strict=True))
    setup = PagedSetup(context_lens, num_kv_heads, head_dim, block_size, torch.bfloat16, seed=15)
    out, expected = run_prefill(setup, q_lens, num_heads, head_dim, seed=16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, **BF16_TOL)
