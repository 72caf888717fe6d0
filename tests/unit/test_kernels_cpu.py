"""The C decode-attention kernel for CPUs against the torch reference, its checks and its build."""

from __future__ import annotations

import itertools
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedserve import kernels
from pagedserve.kernels import attention_ref, cpu_attention, cpu_build

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler here")

HEADS = [(8, 8), (8, 2), (8, 1), (9, 3)]  # GQA ratios 1, 4, 8 and SmolLM2's 3
SHAPES = list(itertools.product(HEADS, [32, 64, 128], [8, 16, 32]))
TOL = dict(atol=2e-5, rtol=2e-5)


def random_decode(context_lens, heads, kv_heads, head_dim, block_size, seed=0, spare=5):
    """Scattered blocks; padding table entries point at other sequences' blocks."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [max(1, -(-n // block_size)) for n in context_lens]
    num_blocks = sum(per_seq) + spare
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    order = torch.randperm(num_blocks, generator=gen)
    width = max(per_seq)
    tables = order[:width].repeat(len(context_lens), 1).to(torch.int32)
    start = 0
    for row, n in enumerate(per_seq):
        tables[row, :n] = order[start:start + n]
        start += n
    query = torch.randn(len(context_lens), heads, head_dim, generator=gen)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return query, k_cache, v_cache, tables, lens, 1 / math.sqrt(head_dim)


@pytest.mark.parametrize(("heads", "head_dim", "block_size"), SHAPES,
                         ids=[f"h{h}kv{kv}-d{d}-bs{bs}" for (h, kv), d, bs in SHAPES])
def test_decode_matches_reference(heads, head_dim, block_size):
    bs = block_size
    lens = [1, bs - 1, bs, bs + 1, 2 * bs, 3 * bs + 5, 5, 7 * bs + 3]
    args = random_decode(lens, *heads, head_dim, block_size, seed=head_dim + block_size)
    out = cpu_attention.paged_decode_attention(*args)
    torch.testing.assert_close(out, attention_ref.paged_decode_attention(*args), **TOL)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 2, 33])
def test_batch_sizes_and_thread_counts_agree(batch, threads):
    """Few sequences split their heads across threads; many run whole sequences per thread."""
    lens = [(37 * i) % 300 + 1 for i in range(batch)]
    args = random_decode(lens, 8, 2, 64, 16, seed=batch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_attention.paged_decode_attention(*args)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, attention_ref.paged_decode_attention(*args), **TOL)


def test_query_as_a_strided_view_and_int64_indices():
    """The model passes q as a slice of its rotated q/k tensor and may pass int64 tables."""
    query, k_cache, v_cache, tables, lens, scale = random_decode([40, 3, 17], 9, 3, 64, 16)
    qk = torch.cat([query, torch.randn(3, 3, 64)], dim=1)  # [B, heads + kv_heads, D]
    strided = qk[:, :9]
    assert not strided.is_contiguous()
    out = cpu_attention.paged_decode_attention(strided, k_cache, v_cache, tables.long(),
                                               lens.long(), scale)
    expected = attention_ref.paged_decode_attention(query, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out, expected, **TOL)


def test_one_token_context_returns_that_value():
    query, k_cache, v_cache, tables, lens, scale = random_decode([1], 8, 2, 64, 16)
    out = cpu_attention.paged_decode_attention(query, k_cache, v_cache, tables, lens, scale)
    first = v_cache[tables[0, 0], 0]  # [kv_heads, D]
    torch.testing.assert_close(out[0], first.repeat_interleave(4, dim=0), atol=0, rtol=0)


@pytest.mark.parametrize("bad", ["block_id", "negative_id", "too_long", "negative_len"])
def test_out_of_range_indices_raise_instead_of_reading_memory(bad):
    query, k_cache, v_cache, tables, lens, scale = random_decode([20, 40], 8, 2, 64, 16)
    if bad == "block_id":
        tables[1, 2] = k_cache.shape[0]
    elif bad == "negative_id":
        tables[0, 0] = -1
    elif bad == "too_long":
        lens[1] = tables.shape[1] * 16 + 1
    else:
        lens[0] = -3
    with pytest.raises(ValueError, match="outside the block table or cache"):
        cpu_attention.paged_decode_attention(query, k_cache, v_cache, tables, lens, scale)


def test_mismatched_rows_raise():
    query, k_cache, v_cache, tables, lens, scale = random_decode([20, 40], 8, 2, 64, 16)
    with pytest.raises(ValueError, match="must have 2 rows"):
        cpu_attention.paged_decode_attention(query, k_cache, v_cache, tables[:1], lens, scale)


def test_dispatch_uses_the_kernel_for_float32_and_the_reference_otherwise(monkeypatch):
    query, k_cache, v_cache, *_ = random_decode([20], 8, 2, 64, 16)
    assert kernels._use_cpu_decode(query, k_cache, v_cache)
    half = [t.bfloat16() for t in (query, k_cache, v_cache)]
    assert not kernels._use_cpu_decode(*half)  # 16-bit: the reference's float32 math
    assert not cpu_attention.supports(query, k_cache[:, :, :1], v_cache[:, :, :1])  # strided
    monkeypatch.setenv("PAGEDSERVE_ATTENTION", "torch")
    assert not kernels._use_cpu_decode(query, k_cache, v_cache)


_OPENMP_RUNTIMES = """
import sys
from pathlib import Path

def runtimes():
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {l.split()[-1] for l in lines if any(n in l for n in ("libgomp", "libiomp", "libomp"))}

import torch
before = runtimes()
from pagedserve.kernels import cpu_attention
assert cpu_attention.available()
print(sorted(before), sorted(runtimes()))
sys.exit(0 if before and runtimes() == before else 1)
"""


def test_shares_torchs_openmp_runtime():
    """Loading the kernel adds no OpenMP runtime: it runs on torch's threads, not a second pool."""
    if sys.platform != "linux" or not Path("/proc/self/maps").exists():
        pytest.skip("reads /proc/self/maps")
    done = subprocess.run([sys.executable, "-c", _OPENMP_RUNTIMES], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_without_a_compiler_it_warns_and_the_reference_is_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists and always fails, like a broken toolchain
    cpu_build.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pagedserve.kernels.cpu_build"):
            assert not cpu_attention.available()
        assert "falling back to torch" in caplog.text
        args = random_decode([9, 30], 8, 2, 64, 16)
        torch.testing.assert_close(kernels.paged_decode_attention(*args),
                                   attention_ref.paged_decode_attention(*args), atol=0, rtol=0)
        assert not list(tmp_path.rglob("*.so"))
    finally:
        cpu_build.load.cache_clear()


def test_builds_once_into_the_cache_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    cpu_build.load.cache_clear()
    try:
        assert cpu_attention.available()
        built = list((tmp_path / "kernels").glob("cpu_attention-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_build.load.cache_clear()
        assert cpu_attention.available()
        assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        cpu_build.load.cache_clear()


def test_unwritable_cache_warns_and_falls_back(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(blocker))  # kernels/ cannot be made under a file
    cpu_build.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pagedserve.kernels.cpu_build"):
            assert not cpu_attention.available()
        assert "falling back to torch" in caplog.text
    finally:
        cpu_build.load.cache_clear()
