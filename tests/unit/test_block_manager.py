"""BlockManager: reference counts, prefix caching by chained hashes, LRU reuse of freed blocks."""

from __future__ import annotations

import random

import pytest

from pagedserve.replicas.engine import block_manager as bm_module
from pagedserve.replicas.engine.block_manager import BlockManager, block_hash
from pagedserve.replicas.engine.sequence import Sequence
from pagedserve.sampling_params import SamplingParams

BS = 4


def make_seq(tokens, block_size: int = BS, leader: Sequence | None = None) -> Sequence:
    seq = Sequence("req", 0, list(tokens), SamplingParams(), block_size)
    seq.leader = leader
    return seq


def compute(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """Allocate and mark `num_tokens` (default: all) tokens computed, as a step would."""
    num_tokens = len(seq) if num_tokens is None else num_tokens
    assert bm.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    bm.register_computed_blocks(seq)


def admit(bm: BlockManager, seq: Sequence) -> None:
    """Prefix match, then allocate the rest of the sequence."""
    bm.match_prefix(seq)
    assert bm.allocate(seq, len(seq))


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table)
        for block_id in seq.block_table:
            refs[block_id] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    assert set(bm.free_block_ids) == {i for i, r in enumerate(refs) if r == 0}
    for h, block_id in bm.hash_to_block.items():
        assert bm.blocks[block_id].hash == h


# allocation and reference counts


def test_allocate_grows_block_table_and_counts_refs():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(10))
    assert bm.blocks_needed(seq, 10) == 3
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    assert bm.allocate(seq, 12)  # still fits in three blocks
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.blocks_needed(seq, 13) == 1
    assert bm.allocate(seq, 13)
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 4
    check_invariants(bm, [seq])


def test_allocate_fails_without_partial_allocation():
    bm = BlockManager(num_blocks=3, block_size=BS)
    seq = make_seq(range(20))
    assert not bm.allocate(seq, 20)  # needs five blocks
    assert seq.block_table == []
    assert bm.num_free_blocks == 3
    check_invariants(bm, [])


def test_free_releases_blocks_and_resets_sequence():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(9))
    compute(bm, seq)
    assert seq.num_hashed_blocks == 2
    bm.free(seq)
    assert seq.block_table == [] and seq.block_hashes == [] and seq.num_hashed_blocks == 0
    assert bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_shared_block_freed_only_when_last_holder_frees():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a)
    b = make_seq(range(9))
    admit(bm, b)
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared
    assert [bm.blocks[i].ref_count for i in shared] == [2, 2]
    check_invariants(bm, [a, b])
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in shared] == [1, 1]
    assert not set(shared) & set(bm.free_block_ids)
    check_invariants(bm, [b])
    bm.free(b)
    assert bm.num_free_blocks == 8
    check_invariants(bm, [])


# prefix matching


def test_blocks_are_findable_only_after_registration():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(13))
    assert bm.allocate(a, 13)
    b = make_seq(range(13))
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_computed_tokens == 0  # allocated, not computed

    a.num_computed_tokens = 6  # one full block computed
    bm.register_computed_blocks(a)
    c = make_seq(range(13))
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:1]
    assert c.num_computed_tokens == c.num_cached_tokens == 4
    assert c.num_hashed_blocks == 1

    a.num_computed_tokens = 13
    bm.register_computed_blocks(a)
    d = make_seq(range(13))
    bm.match_prefix(d)
    assert d.block_table == a.block_table[:3]
    assert d.num_computed_tokens == d.num_cached_tokens == 12
    assert d.block_hashes == a.block_hashes[:3]


def test_partial_block_is_never_registered():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(7))
    compute(bm, a)
    assert len(bm.hash_to_block) == 1
    b = make_seq([*range(7), 99, 100])
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4


def test_match_never_covers_the_whole_prompt():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(8))
    compute(bm, a)
    assert len(bm.hash_to_block) == 2
    b = make_seq(range(8))  # both blocks cached, but one token must be left to compute
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4
    assert b.num_uncomputed_tokens == 4
    c = make_seq(range(9))
    bm.match_prefix(c)
    assert c.num_computed_tokens == 8 and c.num_uncomputed_tokens == 1


def test_hash_chaining_distinguishes_parents():
    assert block_hash(None, [5, 6, 7, 8]) != block_hash(block_hash(None, [9, 9, 9, 9]), [5, 6, 7, 8])
    bm = BlockManager(num_blocks=10, block_size=BS)
    compute(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8]))
    compute(bm, make_seq([9, 9, 9, 9, 0, 0, 0, 0]))
    # Second block's tokens are cached, but after a different first block.
    b = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 1])
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4
    # A first block that nobody computed stops the match even if later blocks are cached.
    c = make_seq([3, 3, 3, 3, 5, 6, 7, 8, 1])
    bm.match_prefix(c)
    assert c.num_computed_tokens == 0 and c.block_table == []


def test_block_hash_is_deterministic_and_token_sensitive():
    assert block_hash(None, [1, 2, 3]) == block_hash(None, [1, 2, 3])
    assert block_hash(None, [1, 2, 3]) != block_hash(None, [1, 2, 4])
    assert block_hash(None, [1, 2, 3]) != block_hash(None, [3, 2, 1])
    assert block_hash(7, [1, 2, 3]) != block_hash(8, [1, 2, 3])


def test_token_check_rejects_forged_hash_entry():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq([1, 2, 3, 4, 5])
    compute(bm, a)
    victim = [7, 7, 7, 7]
    bm.hash_to_block[block_hash(None, victim)] = a.block_table[0]  # points at other tokens
    b = make_seq([*victim, 8])
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert bm.blocks[a.block_table[0]].ref_count == 1


def test_token_check_rejects_hash_collision(monkeypatch):
    monkeypatch.setattr(bm_module, "block_hash", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(bm, a)
    assert bm.hash_to_block == {42: a.block_table[0]}  # the duplicate hash kept the first block
    b = make_seq([0, 0, 0, 0, 1])
    bm.match_prefix(b)
    assert b.num_computed_tokens == 0
    # Same first block matches; the colliding second one (other tokens) must not.
    c = make_seq([1, 2, 3, 4, 0, 0, 0, 0, 1])
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:1]
    assert c.num_computed_tokens == 4


def test_duplicate_content_keeps_first_block_findable():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(range(5)), make_seq(range(5))
    assert bm.allocate(a, 5) and bm.allocate(b, 5)  # computed independently
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.register_computed_blocks(seq)
    assert a.block_hashes[0] == b.block_hashes[0]
    assert bm.hash_to_block[a.block_hashes[0]] == a.block_table[0]
    c = make_seq(range(5))
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:1]


def test_disabled_prefix_caching_matches_nothing():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(range(9))
    compute(bm, a)
    b = make_seq(range(9))
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_computed_tokens == 0


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_sibling_shares_leader_prompt_blocks(enable_prefix_caching):
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=enable_prefix_caching)
    leader = make_seq(range(10))
    compute(bm, leader)
    sibling = make_seq(range(10), leader=leader)
    bm.match_prefix(sibling)
    assert sibling.block_table == leader.block_table[:2]
    assert sibling.num_computed_tokens == 8
    assert all(bm.blocks[b].ref_count == 2 for b in leader.block_table[:2])


def test_match_prefix_is_a_no_op_for_a_sequence_with_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    compute(bm, make_seq(range(9)))
    b = make_seq(range(9))
    assert bm.allocate(b, 2)
    table = list(b.block_table)
    bm.match_prefix(b)
    assert b.block_table == table and b.num_computed_tokens == 0


def test_record_admission_counts_hit_rate():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a)
    bm.record_admission(a)
    b = make_seq(range(9))
    bm.match_prefix(b)
    bm.record_admission(b)
    assert bm.num_prefix_queries == 18
    assert bm.num_prefix_hits == 8


# LRU reuse of freed cached blocks


def test_freed_cached_blocks_stay_findable_until_reused():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a)
    cached = a.block_hashes[:2]
    bm.free(a)
    assert bm.num_free_blocks == 6
    assert bm.cached_block_hashes() == set(cached)
    b = make_seq(range(9))
    bm.match_prefix(b)
    assert b.num_computed_tokens == 8


def test_free_blocks_reused_least_recently_freed_first():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq([1] * 8 + [0])  # 3 blocks, 2 hashed
    e = make_seq([2] * 8 + [0])
    compute(bm, a)
    compute(bm, e)
    assert bm.num_free_blocks == 0
    a_table, a_hashes, e_hashes = list(a.block_table), list(a.block_hashes), list(e.block_hashes)
    bm.free(a)  # freed first: reused first
    bm.free(e)
    taker = make_seq([3] * 12)
    assert bm.allocate(taker, 12)
    assert set(taker.block_table) == set(a_table)
    assert taker.block_table[-1] == a_table[0]  # the prefix head went back last
    assert len(a_hashes) == len(e_hashes) == 2
    assert all(h not in bm.hash_to_block for h in a_hashes)
    assert all(h in bm.hash_to_block for h in e_hashes)
    probe_a, probe_e = make_seq([1] * 8 + [0]), make_seq([2] * 8 + [0])
    bm.match_prefix(probe_a)
    bm.match_prefix(probe_e)
    assert probe_a.num_computed_tokens == 0
    assert probe_e.num_computed_tokens == 8


def test_prefix_head_survives_longest():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a)
    a_table = list(a.block_table)
    bm.free(a)
    taker = make_seq([50, 51, 52, 53, 54])  # takes two of a's blocks: the tail first
    assert bm.allocate(taker, 5)
    assert taker.block_table == [a_table[2], a_table[1]]
    b = make_seq(range(9))
    bm.match_prefix(b)
    assert b.block_table == a_table[:1]
    assert b.num_computed_tokens == 4


def test_revived_cached_block_leaves_free_list():
    bm = BlockManager(num_blocks=5, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a)
    a_table = list(a.block_table)
    bm.free(a)
    b = make_seq(range(9))
    bm.match_prefix(b)
    revived = b.block_table[:2]
    assert revived == a_table[:2]
    assert not set(revived) & set(bm.free_block_ids)
    assert bm.num_free_blocks == 3
    assert [bm.blocks[i].ref_count for i in revived] == [1, 1]
    # Everything left can be handed out without ever returning a revived block.
    other = make_seq(range(100, 112))
    assert bm.allocate(other, 12)
    assert not set(other.block_table) & set(revived)
    assert bm.num_free_blocks == 0
    assert not bm.allocate(make_seq([0]), 1)
    assert b.num_computed_tokens == 8 and bm.hash_to_block[b.block_hashes[0]] == revived[0]
    check_invariants(bm, [b, other])


def test_revived_block_is_evicted_from_lru_order():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a)
    head = a.block_table[0]
    bm.free(a)
    assert list(bm.free_block_ids)[-1] == head
    b = make_seq(range(5))
    bm.match_prefix(b)
    assert b.block_table == [head]
    assert bm.blocks[head].ref_count == 1
    assert head not in bm.free_block_ids
    bm.free(b)  # back at the end of the free list, still cached
    assert list(bm.free_block_ids)[-1] == head
    taker = make_seq(range(100, 112))
    assert bm.allocate(taker, 12)
    assert head not in taker.block_table


def test_everything_freed_returns_all_blocks_randomized():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=BS)
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    live: list[Sequence] = []
    for _ in range(300):
        if live and (rng.random() < 0.4 or bm.num_free_blocks < 6):
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        else:
            tokens = rng.choice(prefixes)[:rng.randrange(1, 13)] + [
                rng.randrange(50) for _ in range(rng.randrange(0, 10))]
            seq = make_seq(tokens or [1])
            bm.match_prefix(seq)
            assert seq.num_computed_tokens < len(seq)
            if bm.allocate(seq, len(seq)):
                seq.num_computed_tokens = len(seq)
                bm.register_computed_blocks(seq)
                live.append(seq)
            else:
                bm.free(seq)
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    check_invariants(bm, [])


def test_hash_collision_with_same_tokens_but_other_parent_never_matches(monkeypatch):
    monkeypatch.setattr(bm_module, "block_hash", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq([1, 2, 3, 4, 9])
    compute(bm, a)
    # block 2 of b has a's tokens but follows another parent: the forged hash must not match it
    b = make_seq([1, 2, 3, 4, 1, 2, 3, 4, 5])
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:1]
    assert b.num_computed_tokens == 4
