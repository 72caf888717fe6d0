"""Triton paged-attention kernels against the torch references, on fresh random inputs.

Every kernel test runs in one of two modes:
- "interpreter": small shapes, CPU tensors, Triton's interpreter. `triton.jit` reads
  TRITON_INTERPRET when a kernel is defined, so these tests run only in a child pytest that
  `test_kernels_under_triton_interpreter` starts with the variable set; this process never
  imports the kernels, and other tests are unaffected.
- "cuda": larger shapes on a GPU, bf16 (marked `gpu`, skipped without one).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedserve import kernels
from pagedserve.kernels import attention_ref as ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MODES = [
    pytest.param("interpreter", marks=pytest.mark.skipif(
        not INTERPRET, reason="runs in test_kernels_under_triton_interpreter's child pytest")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        INTERPRET, reason="the interpreter run uses CPU tensors")]),
]
HEADS = {"interpreter": [(4, 4), (8, 2), (8, 1)], "cuda": [(32, 32), (32, 8), (32, 4)]}
HEAD_RATIO_IDS = ["gqa1", "gqa4", "gqa8"]


def triton_module(name: str):
    return importlib.import_module(f"pagedserve.kernels.{name}")


def device_of(mode: str) -> str:
    return "cuda" if mode == "cuda" else "cpu"


def dtype_of(mode: str) -> torch.dtype:
    return torch.bfloat16 if mode == "cuda" else torch.float32


def assert_matches(name: str, out: torch.Tensor, expected: torch.Tensor) -> None:
    """Relative error in the 2-norm, plus an elementwise check; prints both for the record."""
    low_precision = out.dtype != torch.float32
    out, expected = out.float().cpu(), expected.float().cpu()
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    rel = ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    max_abs = (out - expected).abs().max().item() if out.numel() else 0.0
    print(f"{name}: rel_err={rel:.2e} max_abs_err={max_abs:.2e}")
    tol = dict(atol=3e-2, rtol=3e-2) if low_precision else dict(atol=1e-4, rtol=1e-4)
    assert rel < (1e-2 if low_precision else 1e-5), f"{name}: relative error {rel:.2e}"
    torch.testing.assert_close(out, expected, **tol)


class Paged:
    """K/V of ragged sequences stored in shuffled blocks; spare rows hold large garbage."""

    def __init__(self, context_lens, num_kv_heads, head_dim, block_size, dtype, device, seed):
        gen = torch.Generator().manual_seed(seed)
        per_seq = [-(-n // block_size) for n in context_lens]
        num_blocks = sum(per_seq) + 3
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = ((torch.randn(shape, generator=gen) * 100).to(dtype)).to(device)
        self.v_cache = ((torch.randn(shape, generator=gen) * 100).to(dtype)).to(device)
        order = torch.randperm(num_blocks, generator=gen).tolist()
        tables = []
        for n in per_seq:
            tables.append(order[:n])
            order = order[n:]
        width = max(max(per_seq), 1)
        # Padding entries are valid ids of other sequences' blocks, as the runner may leave them.
        self.block_tables = torch.tensor([t + [order[0]] * (width - len(t)) for t in tables],
                                         dtype=torch.int32, device=device)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        slots = [t[p // block_size] * block_size + p % block_size
                 for t, n in zip(tables, context_lens, strict=True) for p in range(n)]
        total = len(slots)
        keys = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
        values = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
        ref.store_kv(keys, values, self.k_cache, self.v_cache,
                     torch.tensor(slots, dtype=torch.long, device=device))

    def caches_f32(self):
        return self.k_cache.float(), self.v_cache.float()


def random_query(rows, num_heads, head_dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, num_heads, head_dim, generator=gen).to(dtype).to(device)


# store_kv


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key_dtype", [torch.float32, None], ids=["cast", "same"])
def test_store_kv_matches_reference(mode, key_dtype):
    device, dtype = device_of(mode), dtype_of(mode)
    num_kv_heads, head_dim, block_size, num_blocks, tokens = (
        (3, 64, 8, 6, 20) if mode == "interpreter" else (8, 128, 16, 400, 3000))
    gen = torch.Generator().manual_seed(20)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    # key/value as strided column slices of one fused projection, as the model passes them.
    fused = torch.randn(tokens, 3 * num_kv_heads * head_dim, generator=gen)
    fused = fused.to(key_dtype or dtype).to(device)
    key = fused[:, : num_kv_heads * head_dim].view(tokens, num_kv_heads, head_dim)
    value = fused[:, 2 * num_kv_heads * head_dim:].view(tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::3] = -1
    slots = slots.to(device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref.store_kv(key, value, k_ref, v_ref, slots)
    triton_module("triton_store_kv").store_kv(key, value, k_cache, v_cache, slots.int())
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# decode


def decode_lengths(mode: str, block_size: int) -> list[int]:
    bs = block_size
    if mode == "interpreter":
        return [0, 1, bs - 1, bs + 1, 3 * bs + 5, 0, 5 * bs]
    gen = torch.Generator().manual_seed(bs)
    lengths = torch.randint(1, 2000, (30,), generator=gen).tolist()
    return [0, 1, bs, *lengths, 0]


def decode_reference(paged: Paged, query: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference over float32 copies, on the non-empty rows only (it rejects length 0)."""
    live = paged.context_lens > 0
    k, v = paged.caches_f32()
    return ref.paged_decode_attention(query.float()[live], k, v, paged.block_tables[live],
                                      paged.context_lens[live], scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads", [0, 1, 2], ids=HEAD_RATIO_IDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("splits", [None, 3], ids=["auto", "split3"])
def test_decode_matches_reference(mode, heads, head_dim, splits):
    num_heads, num_kv_heads = HEADS[mode][heads]
    device, dtype = device_of(mode), dtype_of(mode)
    block_size = 8 if mode == "interpreter" else 16
    paged = Paged(decode_lengths(mode, block_size), num_kv_heads, head_dim, block_size, dtype,
                  device, seed=heads * 10 + head_dim)
    batch = paged.context_lens.shape[0]
    query = random_query(batch, num_heads, head_dim, dtype, device, seed=21)
    scale = head_dim**-0.5
    decode = triton_module("triton_decode")
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, scale)
    out = (decode.paged_decode_attention(*args) if splits is None
           else decode.paged_decode_attention_splits(*args, num_splits=splits))
    assert out.shape == query.shape and out.dtype == dtype
    live = paged.context_lens > 0
    assert torch.all(out[~live] == 0), "padding rows (context 0) must be zeros"
    name = f"decode {mode} {dtype} h{num_heads}/kv{num_kv_heads} d{head_dim} splits={splits}"
    assert_matches(name, out[live], decode_reference(paged, query, scale))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size", [8, 32])
def test_decode_other_block_sizes_and_unread_padding_tables(mode, block_size):
    """Padding rows point at block ids far outside the cache: a read through them would fault."""
    device, dtype = device_of(mode), dtype_of(mode)
    lengths = [3 * block_size + 1, 0, 2, 0, 7 * block_size]
    paged = Paged(lengths, 2, 64, block_size, dtype, device, seed=block_size)
    paged.block_tables[paged.context_lens == 0] = 2**30
    query = random_query(len(lengths), 8, 64, dtype, device, seed=22)
    out = triton_module("triton_decode").paged_decode_attention_splits(
        query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, 0.125,
        num_splits=2)
    assert torch.all(out[paged.context_lens == 0] == 0)
    live = paged.context_lens > 0
    paged.block_tables[~live] = 0  # the reference gathers the whole table
    assert_matches(f"decode {mode} {dtype} bs{block_size}", out[live],
                   decode_reference(paged, query, 0.125))


@pytest.mark.parametrize("mode", MODES)
def test_decode_rejects_unsupported_arguments(mode):
    device, dtype = device_of(mode), dtype_of(mode)
    paged = Paged([5, 9], 2, 64, 8, dtype, device, seed=23)
    query = random_query(2, 8, 64, dtype, device, seed=24)
    decode = triton_module("triton_decode").paged_decode_attention
    good = dict(query=query, k_cache=paged.k_cache, v_cache=paged.v_cache,
                block_tables=paged.block_tables, context_lens=paged.context_lens, scale=0.1)
    bad_cases = {
        "head_dim": dict(query=query[..., :48].contiguous(),
                         k_cache=paged.k_cache[..., :48].contiguous(),
                         v_cache=paged.v_cache[..., :48].contiguous()),
        "block_size": dict(k_cache=paged.k_cache[:, :6].contiguous(),
                           v_cache=paged.v_cache[:, :6].contiguous()),
        "contiguous": dict(k_cache=paged.k_cache.transpose(0, 1),
                           v_cache=paged.v_cache.transpose(0, 1)),
        "dtype": dict(query=query.half() if dtype != torch.float16 else query.float()),
        "multiple of kv heads": dict(query=query[:, :7]),
        "context_lens": dict(context_lens=paged.context_lens[:1]),
        "int32 or int64": dict(block_tables=paged.block_tables.float()),
    }
    for message, change in bad_cases.items():
        with pytest.raises(ValueError, match=message):
            decode(**{**good, **change})


def test_decode_splits_a_partial_wave_and_long_contexts_only():
    """The split choice on an H200's 132 multiprocessors, tables 2048 tokens wide: 512 programs
    (an 8B model's rank at TP=2, batch 128) split in two, 1024 and more stay whole, few long
    sequences split many ways, and short tables never split into less than 4 tiles each."""
    pytest.importorskip("triton")
    choose = triton_module("triton_decode").choose_num_splits
    assert choose(128, 4, 2048, 132) == 2
    assert choose(128, 8, 2048, 132) == 1
    assert choose(256, 4, 2048, 132) == 1
    assert choose(64, 4, 2048, 132) == 3
    assert choose(4, 8, 32768, 132) == 17
    assert choose(1, 1, 256, 132) == 1  # 4 tiles: one split at least that long
    assert choose(0, 8, 0, 132) == 1


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_decode_replays_in_a_cuda_graph():
    """Captured once, replayed on new lengths and queries: no host sync, shape-only grid."""
    decode = triton_module("triton_decode")
    lengths = [1000, 0, 17, 2048, 0, 300]
    paged = Paged(lengths, 8, 64, 16, torch.bfloat16, "cuda", seed=25)
    query = random_query(len(lengths), 32, 64, torch.bfloat16, "cuda", seed=26)
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, 0.125)
    assert decode.choose_num_splits(len(lengths), 8, paged.block_tables.shape[1] * 16,
                                    decode._multiprocessors(query.device)) > 1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode.paged_decode_attention(*args)  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode.paged_decode_attention(*args)
    query.copy_(random_query(len(lengths), 32, 64, torch.bfloat16, "cuda", seed=27))
    # Shorter or emptied rows only: growing a row would read its padding blocks' garbage.
    paged.context_lens.copy_(torch.tensor([5, 0, 0, 2047, 0, 299], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    live = paged.context_lens > 0
    assert torch.all(out[~live] == 0)
    assert_matches("decode cuda graph replay bfloat16", out[live],
                   decode_reference(paged, query, 0.125))


# prefill


def prefill_cases(mode: str, block_size: int) -> list[tuple[int, int]]:
    """(context_len, q_len): whole prompts, cached prefixes, chunks crossing block boundaries."""
    bs = block_size
    cases = [(bs + 3, bs + 3), (1, 1), (3 * bs, bs), (2 * bs + 5, bs + 2), (bs - 1, 1),
             (4 * bs + 1, 7), (70, 70)]
    if mode == "cuda":
        cases += [(1500, 600), (1100, 1100), (777, 129), (2 * bs, 2 * bs), (333, 64)]
    return cases


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads", [0, 1, 2], ids=HEAD_RATIO_IDS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_matches_reference(mode, heads, head_dim):
    num_heads, num_kv_heads = HEADS[mode][heads]
    device, dtype = device_of(mode), dtype_of(mode)
    block_size = 8 if mode == "interpreter" else 16
    context_lens, q_lens = zip(*prefill_cases(mode, block_size), strict=True)
    paged = Paged(list(context_lens), num_kv_heads, head_dim, block_size, dtype, device,
                  seed=heads * 3 + head_dim)
    query = random_query(sum(q_lens), num_heads, head_dim, dtype, device, seed=28)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                          device=device)
    scale = head_dim**-0.5
    out = triton_module("triton_prefill").paged_prefill_attention(
        query, paged.k_cache, paged.v_cache, paged.block_tables, starts, paged.context_lens,
        scale)
    k, v = paged.caches_f32()
    expected = ref.paged_prefill_attention(query.float(), k, v, paged.block_tables, starts,
                                           paged.context_lens, scale)
    assert out.shape == query.shape and out.dtype == dtype
    assert_matches(f"prefill {mode} {dtype} h{num_heads}/kv{num_kv_heads} d{head_dim}", out,
                   expected)


@pytest.mark.parametrize("mode", MODES)
def test_prefill_rejects_unsupported_arguments(mode):
    device, dtype = device_of(mode), dtype_of(mode)
    paged = Paged([5, 9], 2, 64, 8, dtype, device, seed=29)
    query = random_query(6, 8, 64, dtype, device, seed=30)
    starts = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    prefill = triton_module("triton_prefill").paged_prefill_attention
    with pytest.raises(ValueError, match="query_start_loc"):
        prefill(query, paged.k_cache, paged.v_cache, paged.block_tables, starts[:2],
                paged.context_lens, 0.1)
    with pytest.raises(ValueError, match="stride 1 along head_dim"):
        prefill(query.transpose(1, 2).contiguous().transpose(1, 2), paged.k_cache,
                paged.v_cache, paged.block_tables, starts, paged.context_lens, 0.1)


# dispatch


def test_cpu_tensors_use_the_reference(monkeypatch):
    """16-bit CPU attention goes to the reference (float32 goes to the C kernel when it builds:
    test_kernels_cpu.py), never to Triton."""
    calls = []
    monkeypatch.setattr(ref, "paged_decode_attention", lambda *a: calls.append(a) or "ref")
    query, cache = torch.zeros(1, 2, 64, dtype=torch.bfloat16), torch.zeros(2, 16, 1, 64,
                                                                             dtype=torch.bfloat16)
    assert kernels.paged_decode_attention(query, cache, cache, None, None, 1) == "ref"
    assert calls


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="PAGEDSERVE_ATTENTION"):
        kernels.store_kv(None, None, torch.zeros(1), None, None)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="dispatch to Triton needs CUDA tensors")
@pytest.mark.parametrize("backend", ["", "torch"])
def test_cuda_tensors_use_triton_unless_forced_to_torch(monkeypatch, backend):
    monkeypatch.setenv("PAGEDSERVE_ATTENTION", backend)
    paged = Paged([40, 3], 2, 64, 16, torch.bfloat16, "cuda", seed=31)
    query = random_query(2, 8, 64, torch.bfloat16, "cuda", seed=32)
    used = []
    for module in (ref, triton_module("triton_decode")):
        original = module.paged_decode_attention
        monkeypatch.setattr(module, "paged_decode_attention",
                            lambda *a, m=module, f=original: used.append(m) or f(*a))
    kernels.paged_decode_attention(query, paged.k_cache, paged.v_cache, paged.block_tables,
                                   paged.context_lens, 0.125)
    assert used == [ref if backend == "torch" else triton_module("triton_decode")]


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="the engine runs the kernels on CUDA only")
def test_engine_greedy_tokens_equal_with_triton_and_torch_attention(tmp_path, monkeypatch):
    """A head_dim-64 GQA model on CUDA in float32: the kernels change no greedy token."""
    import transformers
    from tiny_models import TINY_VOCAB, tiny_tokenizer

    from pagedserve import LLM, SamplingParams

    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init make greedy choices clear-cut
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(33)
    prompts = [torch.randint(3, TINY_VOCAB, (n,), generator=gen).tolist()
               for n in (1, 17, 40, 100, 300, 5)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    calls = []
    for name in ("triton_decode", "triton_prefill"):
        module = triton_module(name)
        entry = "paged_decode_attention" if name == "triton_decode" else "paged_prefill_attention"
        original = getattr(module, entry)
        monkeypatch.setattr(module, entry, lambda *a, n=name, f=original: calls.append(n) or f(*a))
    tokens = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PAGEDSERVE_ATTENTION", backend)
        llm = LLM(str(tmp_path), progress=False, dtype="float32", num_kvcache_blocks=256)
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens[backend] = [out.outputs[0].token_ids for out in outs]
        del llm
    assert {"triton_decode", "triton_prefill"} <= set(calls)
    assert tokens["triton"] == tokens["torch"]


# the interpreter run


@pytest.mark.skipif(INTERPRET, reason="this is the interpreter run")
def test_kernels_under_triton_interpreter():
    """Runs this file's interpreter-mode tests in a child pytest with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreter",
           str(Path(__file__).resolve())]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, summary
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 20, summary
