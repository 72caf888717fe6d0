"""Triton paged-attention kernels vs the torch references on one GPU.

Decode at the throughput benchmark's steady state (batch 256, contexts around 1100 tokens,
Llama-1B-like heads: 32 query heads, 8 kv heads, head_dim 64, bf16, block size 16), the same
at head_dim 128 and batch 64, a few tile configurations of the decode kernel, a small-batch
long-context case where split-K matters, one rank's heads of an 8B-shaped model at TP=1 and
TP=2 (32/8 and 16/4 heads, batch 64/128/256, the throughput workload's contexts in tables
2048 tokens wide as the engine's decode graphs have them, 1-8 splits), and packed causal
prefills. Times are medians of `triton.testing.do_bench` (CUDA events); bandwidth counts the
K/V bytes the kernel must read once. Prints a table last.

    python benchmarks/attention_kernels.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton.testing

from pagedserve.kernels import attention_ref as ref
from pagedserve.kernels import triton_decode, triton_prefill

HEADS, KV_HEADS, BLOCK_SIZE = 32, 8, 16
DTYPE = torch.bfloat16


def paged_inputs(context_lens: list[int], head_dim: int, seed: int, kv_heads: int = KV_HEADS,
                 table_blocks: int = 0):
    """Random caches with each sequence's blocks scattered; returns (k, v, tables, lens).

    The tables are `table_blocks` wide (at least the longest sequence's blocks), as an engine's
    captured decode graph pads them to the model's maximum length.
    """
    gen = torch.Generator().manual_seed(seed)
    per_seq = [math.ceil(n / BLOCK_SIZE) for n in context_lens]
    num_blocks = sum(per_seq)
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    order = torch.randperm(num_blocks, generator=gen)
    width = max(max(per_seq), table_blocks)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    start = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[start:start + n]
        start += n
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return k_cache, v_cache, tables.cuda(), lens.cuda()


def throughput_contexts(batch: int, gen: torch.Generator) -> list[int]:
    """Contexts of a decode batch in the throughput workload: a prompt of 100-1024 tokens plus
    part of an answer of up to 1024."""
    prompts = torch.randint(100, 1025, (batch,), generator=gen)
    return (prompts + torch.randint(0, 1025, (batch,), generator=gen)).tolist()


def kv_bytes(context_lens: list[int], head_dim: int, kv_heads: int = KV_HEADS) -> int:
    return sum(context_lens) * kv_heads * head_dim * 2 * DTYPE.itemsize


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


def decode_rows(batch: int, context_lens: list[int], head_dim: int, configs, seed: int,
                heads: tuple[int, int] = (HEADS, KV_HEADS), table_blocks: int = 0):
    num_heads, kv_heads = heads
    k, v, tables, lens = paged_inputs(context_lens, head_dim, seed, kv_heads, table_blocks)
    query = torch.randn(batch, num_heads, head_dim, dtype=DTYPE, device="cuda")
    scale = head_dim**-0.5
    args = (query, k, v, tables, lens, scale)
    expected = ref.paged_decode_attention(query.float(), k.float(), v.float(), tables, lens, scale)
    label = (f"decode {num_heads}/{kv_heads}h d{head_dim} B={batch} "
             f"ctx~{sum(context_lens) // batch}/{tables.shape[1] * BLOCK_SIZE}")
    rows = [dict(case=label, impl="torch reference", ms=bench_ms(
        lambda: ref.paged_decode_attention(*args)))]
    auto = triton_decode.choose_num_splits(batch, kv_heads, tables.shape[1] * BLOCK_SIZE,
                                           triton_decode._multiprocessors(query.device))
    rows.append(dict(case=label, impl=f"triton auto (splits={auto})",
                     ms=bench_ms(lambda: triton_decode.paged_decode_attention(*args)),
                     rel_err=rel_err(triton_decode.paged_decode_attention(*args), expected)))
    for splits, block_n, warps, stages in configs:
        def run(s=splits, b=block_n, w=warps, st=stages):
            return triton_decode.paged_decode_attention_splits(
                *args, num_splits=s, block_n=b, num_warps=w, num_stages=st)
        rows.append(dict(case=label, impl=f"triton splits={splits} n={block_n} w={warps} "
                         f"st={stages}", ms=bench_ms(run), rel_err=rel_err(run(), expected)))
    for row in rows:
        row["GB/s"] = kv_bytes(context_lens, head_dim, kv_heads) / row["ms"] / 1e6
    return rows


def prefill_rows(num_seqs: int, prompt_len: int, head_dim: int) -> list[dict]:
    lens = [prompt_len] * num_seqs
    k, v, tables, context_lens = paged_inputs(lens, head_dim, seed=3)
    query = torch.randn(sum(lens), HEADS, head_dim, dtype=DTYPE, device="cuda")
    starts = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * prompt_len
    args = (query, k, v, tables, starts, context_lens, head_dim**-0.5)
    label = f"prefill d{head_dim} {num_seqs}x{prompt_len}"
    out = triton_prefill.paged_prefill_attention(*args)
    expected = ref.paged_prefill_attention(*args)
    return [
        dict(case=label, impl="torch reference",
             ms=bench_ms(lambda: ref.paged_prefill_attention(*args))),
        dict(case=label, impl="triton", rel_err=rel_err(out, expected),
             ms=bench_ms(lambda: triton_prefill.paged_prefill_attention(*args))),
    ]


# (splits, block_n, warps, stages) tried on the 8B rows
TP_CONFIGS = [(1, 64, 4, 2), (2, 64, 4, 2), (3, 64, 4, 2), (4, 64, 4, 2), (8, 64, 4, 2),
              (1, 64, 8, 2), (1, 64, 4, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    opts = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    steady = torch.randint(1000, 1201, (256,), generator=gen).tolist()
    configs = [(1, 64, 4, 2), (1, 64, 2, 2), (1, 128, 4, 2), (2, 64, 2, 2), (3, 64, 4, 2)]
    rows = decode_rows(256, steady, 64, configs, seed=1)
    rows += decode_rows(64, steady[:64], 128, configs, seed=4)
    rows += decode_rows(4, [32768] * 4, 64, [(1, 64, 2, 2), (9, 64, 2, 2), (16, 64, 2, 2),
                                             (33, 64, 2, 2), (64, 64, 2, 2)], seed=2)
    for batch in (64, 128, 256):
        for heads in ((32, 8), (16, 4)):  # an 8B-shaped model's rank at TP=1 and at TP=2
            rows += decode_rows(batch, throughput_contexts(batch, gen), 128, TP_CONFIGS,
                                seed=5, heads=heads, table_blocks=2048 // BLOCK_SIZE)
    rows += prefill_rows(8, 1024, 64)
    rows += prefill_rows(8, 1024, 128)
    device = torch.cuda.get_device_name()
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__,
                           triton=triton.__version__, rows=rows), f, indent=1)
    print(f"\n{device}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'case':<40} {'implementation':<32} {'ms':>8} {'GB/s':>7} {'rel_err':>8}")
    for r in rows:
        gbs = f"{r['GB/s']:.0f}" if "GB/s" in r else "-"
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
        print(f"{r['case']:<40} {r['impl']:<32} {r['ms']:>8.3f} {gbs:>7} {err:>8}")


if __name__ == "__main__":
    main()
