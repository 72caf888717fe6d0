"""Hot prefixes: the shared prefix of many requests ranks first, old hits fade, and a prefix
inside a chosen one is not chosen again."""

import pytest
from test_admission import Clock

from pagedserve.cluster.hot_prefixes import HotPrefixes
from pagedserve.replicas.engine.block_manager import prompt_block_hashes

BS = 16


def record(hot: HotPrefixes, tokens: list[int]) -> None:
    hot.record(prompt_block_hashes(tokens, BS), tokens, BS)


def test_the_shared_prefix_of_many_requests_is_the_hottest():
    clock = Clock()
    hot = HotPrefixes(half_life_s=60, max_tokens=512, clock=clock)
    shared = list(range(1000, 1512))  # 512 tokens = 32 blocks
    for i in range(6):
        record(hot, shared + [7, i] * 40)
    record(hot, list(range(5000, 5600)))  # a one-off
    top = hot.top(2)
    assert top[0] == shared
    assert len(top) == 1  # the one-off is no shared prefix; the shared one's parts are covered


def test_old_hits_fade_behind_new_ones():
    clock = Clock()
    hot = HotPrefixes(half_life_s=10, max_tokens=64, clock=clock)
    old, new = list(range(100, 164)), list(range(300, 364))
    for _ in range(8):
        record(hot, old)
    clock.now = 100.0  # ten half-lives later
    for _ in range(3):
        record(hot, new)
    assert hot.top(1) == [new]


def test_prefixes_are_cut_at_max_tokens_and_entries_stay_bounded():
    clock = Clock()
    hot = HotPrefixes(half_life_s=10, max_tokens=32, clock=clock, max_entries=8)
    for i in range(20):
        record(hot, [i] * 100)
        record(hot, [i] * 100)
    assert len(hot) <= 8
    assert all(len(t) == 32 for t in hot.top(3))


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        HotPrefixes(half_life_s=0, max_tokens=8, clock=Clock())
