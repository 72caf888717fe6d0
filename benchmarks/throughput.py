"""Offline throughput: our engine against Hugging Face transformers, same process, same workload.

    python benchmarks/throughput.py                      # CPU: 32 prompts of 16-512 tokens, 64 out
    python benchmarks/throughput.py --device cuda --peers hf-generate,hf-cb   # 1B-shaped model
    python benchmarks/throughput.py --device cuda --model-shape 8b --tensor-parallel-sizes 1,2 --peers ''

On cuda without `--model` the model is a random-weight Llama of Llama-3.2-1B's shape (`--model-shape
8b`: Llama-3.1-8B's), written to a temporary safetensors directory that every contender loads.

With several `--tensor-parallel-sizes` our engine is measured once per size, in that order,
each instance shut down before the next loads; the table then also gives each size over the
first. Throughput is output tokens / wall seconds of one timed run. Our engine's first timed run
is on a fresh engine with only its own readiness warm-up before it (what a new replica's first
requests meet); with `--repeats 3` the table sets it beside the third run (the steady state) and
counts the Triton kernel variants each run loaded (on cuda; 0 = nothing compiled after ready).
The peers get an untimed warm-up run first.
Prompts are random token ids and EOS is ignored, so every request generates exactly its length.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from pagedserve import LLM, SamplingParams
from pagedserve.kernels.triton_cache import VariantCounter
from pagedserve.replicas.models.default_model import default_model_dir, resolve_gguf

try:
    from benchmarks import common, random_model
except ModuleNotFoundError:  # run as `python benchmarks/throughput.py`: benchmarks/ is on sys.path
    import common
    import random_model

PEERS = ("hf-generate", "hf-cb")
FIRST_TOKEN_ID = 10  # ids below this are special tokens in the llama-family vocabularies we serve
DEFAULTS = {  # num_prompts, min_prompt_len, max_prompt_len, (min, max) output length
    "cpu": (32, 16, 512, (64, 64)),
    "cuda": (256, 100, 1024, (100, 1024)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = [("name", "name", "s"), ("requests", "requests", "d"), ("output_tokens", "out tokens", "d"),
           ("wall_s", "wall s", ".2f"), ("tokens_per_s", "tok/s", ".1f"),
           ("steady_tokens_per_s", "last run tok/s", ".1f"), ("first_over_steady", "1st/last", ".3f"),
           ("ratio", "ours/peer", ".2f"), ("peak_mem_mib", "peak MiB", ".0f")]


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    vocab_size: int = 0


@dataclass
class Row:
    name: str
    requests: int
    output_tokens: int = 0
    wall_s: float | None = None
    tokens_per_s: float | None = None
    ratio: float | None = None  # our tokens/s over this row's
    peak_mem_mib: float | None = None
    skipped: str | None = None
    # ours with --repeats: tokens/s of further timed runs on fresh workloads of other seeds
    repeat_tokens_per_s: list[float] | None = None
    # ours: the first timed run on a fresh engine (= tokens_per_s), the last of the repeats
    # (the steady state) and their ratio; Triton kernel variants loaded in each timed run
    first_run_tokens_per_s: float | None = None
    steady_tokens_per_s: float | None = None
    first_over_steady: float | None = None
    kernel_variants_per_run: list[int] | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", help="HF model dir or .gguf file (default: the embedded model on "
                   "cpu, a random-weight model of --model-shape on cuda)")
    p.add_argument("--model-shape", choices=tuple(random_model.SHAPES), default="1b",
                   help="shape of the random-weight model built when --model is not given on cuda")
    p.add_argument("--max-num-batched-tokens", type=int, help="our engine's per-step token budget")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs of our engine: the first on the workload, the others on "
                   "workloads of seeds seed+1, ... (fresh prompts: no prefix-cache hits)")
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--min-prompt-len", type=int)
    p.add_argument("--max-prompt-len", type=int)
    p.add_argument("--output-len", type=int, help="fixed output length (cuda default: 100-1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", default="hf-generate", help=f"comma list from {','.join(PEERS)}")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/...)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    p.add_argument("--tensor-parallel-sizes", default="1",
                   help="comma list: our engine is measured at each (e.g. 1,2; '' for peers only)")
    p.add_argument("--enforce-eager", action="store_true", help="no decode CUDA graphs")
    args = p.parse_args(argv)
    args.tensor_parallel_sizes = [int(n) for n in args.tensor_parallel_sizes.split(",") if n]
    n, lo, hi, out_range = DEFAULTS[args.device]
    args.num_prompts = args.num_prompts or n
    args.max_prompt_len = args.max_prompt_len or hi
    args.min_prompt_len = min(args.min_prompt_len or lo, args.max_prompt_len)
    args.output_range = (args.output_len, args.output_len) if args.output_len else out_range
    args.peers = [name for name in args.peers.split(",") if name]
    if unknown := set(args.peers) - set(PEERS):
        p.error(f"unknown peers {sorted(unknown)}; choose from {list(PEERS)}")
    if args.dtype == "auto":
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    args.out = common.default_out("throughput", args.device, args.out)
    return args


def make_workload(args: argparse.Namespace, vocab_size: int, seed: int | None = None) -> Workload:
    g = torch.Generator().manual_seed(args.seed if seed is None else seed)
    n, (lo, hi) = args.num_prompts, args.output_range
    lens = torch.randint(args.min_prompt_len, args.max_prompt_len + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(FIRST_TOKEN_ID, vocab_size, (k,), generator=g).tolist() for k in lens]
    return Workload(prompts, torch.randint(lo, hi + 1, (n,), generator=g).tolist(), vocab_size)


def warmup_workload(seed: int, vocab_size: int) -> Workload:
    """Two short prompts from another seed, so the timed run never hits the prefix cache."""
    g = torch.Generator().manual_seed(seed + 1)
    return Workload(torch.randint(FIRST_TOKEN_ID, vocab_size, (2, 16), generator=g).tolist(), [4, 4])


def cuda_warmup_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    """32 prompts of the workload's length range, 8-32 tokens out, from another seed.

    Enough to run mixed prefill/decode steps of many shapes: Triton compiles a kernel variant
    per divisibility class of its integer arguments (sequence counts, table strides), about a
    second each, and on a fresh machine those compiles otherwise land in the timed run.
    """
    g = torch.Generator().manual_seed(args.seed + 1000)
    n = min(32, args.num_prompts)
    lens = torch.randint(args.min_prompt_len, args.max_prompt_len + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(FIRST_TOKEN_ID, vocab_size, (k,), generator=g).tolist() for k in lens]
    return Workload(prompts, torch.randint(8, 33, (n,), generator=g).tolist(), vocab_size)


def device_warmup_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    """The untimed warm-up run before each contender: longer on cuda (Triton compiles)."""
    if args.device == "cuda":
        return cuda_warmup_workload(args, vocab_size)
    return warmup_workload(args.seed, vocab_size)


def ours(args, model_dir: Path, tensor_parallel_size: int = 1):
    """Build our engine; return its generate(workload) -> (token counts, wall seconds).

    The function's `close()` shuts the engine's tensor-parallel ranks down.
    """
    kwargs = {"tensor_parallel_size": tensor_parallel_size,
              "enforce_eager": getattr(args, "enforce_eager", False)}
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.device == "cuda":  # the longest request of the workload bounds the block tables
        kwargs["max_model_len"] = args.max_prompt_len + args.output_range[1]
    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, progress=False, **kwargs)

    def generate(w: Workload) -> tuple[list[int], float]:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
        outs, wall = common.timed(args.device, lambda: llm.generate(w.prompts, params, use_tqdm=False))
        return [len(o.outputs[0].token_ids) for o in outs], wall

    generate.close = llm.shutdown
    return generate


def peer(name: str, args, model_dir: Path):
    """Load a fresh transformers model; return its generate(workload) like `ours`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype])
    model = model.to(args.device).eval()
    eos = model.config.eos_token_id
    pad_id = eos if isinstance(eos, int) else 0
    run = hf_generate if name == "hf-generate" else hf_cb_generate
    return lambda w: run(model, w, args.device, pad_id)


def hf_generate(model, w: Workload, device: str, pad_id: int) -> tuple[list[int], float]:
    """One left-padded static batch; every row runs to the longest requested length."""
    width, new = max(map(len, w.prompts)), max(w.output_lens)
    ids = torch.full((len(w.prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(w.prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    config = transformers.GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                           eos_token_id=None, pad_token_id=pad_id)
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        out, wall = common.timed(device, lambda: model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config))
    if out.shape[1] - width != new:
        raise RuntimeError(f"hf-generate: generated {out.shape[1] - width} tokens, expected {new}")
    return list(w.output_lens), wall  # useful tokens: each request's own length


def hf_cb_generate(model, w: Workload, device: str, pad_id: int) -> tuple[list[int], float]:
    """transformers continuous batching, each request with its own max_new_tokens.

    This is what `generate_batch` wraps. The clock runs inside the manager's context, so cache
    allocation and CUDA graph capture are left out, as ours are (they happen when `LLM` is built).
    """
    from transformers.generation.continuous_batching.utils import WorkloadHints

    defaults = transformers.ContinuousBatchingConfig()
    page = getattr(defaults, "page_size", None) or defaults.block_size  # renamed across versions
    pairs = list(zip(w.prompts, w.output_lens, strict=True))
    # On CPU the cache is otherwise sized to 90% of host RAM; give it what the workload needs.
    blocks = sum(math.ceil((len(p) + n) / page) for p, n in pairs) + 1
    cb_config = transformers.ContinuousBatchingConfig(num_blocks=blocks if device == "cpu" else None)
    gen_config = transformers.GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=pad_id,
                                               max_new_tokens=max(w.output_lens))
    hints = WorkloadHints(max(map(len, w.prompts)), max(w.output_lens), len(w.prompts))
    with model.continuous_batching_context_manager(
            generation_config=gen_config, continuous_batching_config=cb_config,
            warmup=device == "cuda", workload_hints=hints) as manager:
        return common.timed(device, lambda: _drain(manager, pairs))


def _drain(manager, pairs: list[tuple[list[int], int]]) -> list[int]:
    ids = [manager.add_request(prompt, max_new_tokens=n) for prompt, n in pairs]
    done: dict[str, int] = {}
    while len(done) < len(ids):
        result = manager.get_result(timeout=1)
        if result is None and not manager.is_running():
            raise RuntimeError("hf-cb: the generation thread stopped")
        if result is not None and result.is_finished():
            if result.error:
                raise RuntimeError(f"hf-cb: {result.error}")
            done[result.request_id] = len(result.generated_tokens)
    return [done[i] for i in ids]


def measure(name: str, build, args, wl: Workload, warm: Workload | None, repeats: int = 1) -> Row:
    """Build a contender, warm it up (`warm`; None: no run before the timed one), time it on
    the workload. A failing peer becomes a skipped row."""
    common.reset_peak_memory(args.device)
    again, generate, variants = [], None, []
    counter = kernel_variant_counter(args.device)
    try:
        generate = build()
        if warm is not None:
            generate(warm)
        before = counter.total if counter else 0
        counts, wall = generate(wl)
        if counts != wl.output_lens:
            raise RuntimeError(f"{name}: generated {counts} tokens, expected {wl.output_lens}")
        for i in range(1, repeats):
            other = make_workload(args, wl.vocab_size, seed=args.seed + i)
            variants.append(counter.total - before if counter else None)
            before = counter.total if counter else 0
            more, more_wall = generate(other)
            again.append(sum(more) / more_wall)
            print(f"{name} repeat {i} (seed {args.seed + i}): {again[-1]:.1f} tok/s", flush=True)
        variants.append(counter.total - before if counter else None)
    except Exception as e:
        if name.startswith("pagedserve"):
            raise
        return Row(name, len(wl.prompts), skipped=f"{type(e).__name__}: {e}")
    finally:
        if hasattr(generate, "close"):
            generate.close()
        generate = None  # free the model (and its KV cache) before the next contender loads
        gc.collect()
    tokens = sum(counts)
    print(f"{name}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s", flush=True)
    first = tokens / wall
    steady = again[-1] if again else None
    return Row(name, len(wl.prompts), tokens, wall, first,
               peak_mem_mib=common.peak_memory_mib(args.device),
               repeat_tokens_per_s=again or None,
               first_run_tokens_per_s=first if warm is None else None,
               steady_tokens_per_s=steady, first_over_steady=first / steady if steady else None,
               kernel_variants_per_run=variants if counter else None)


_COUNTERS: dict[str, VariantCounter] = {}


def kernel_variant_counter(device: str) -> VariantCounter | None:
    """One counter of Triton kernel variants for the whole run (cuda only: none on CPU)."""
    if device != "cuda":
        return None
    if device not in _COUNTERS:
        _COUNTERS[device] = VariantCounter().install()
    return _COUNTERS[device]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; this torch sees none")
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as tmp:
        return run(args, prepare_model_dir(args, Path(tmp)))


def prepare_model_dir(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model:
        model_dir = Path(args.model)
        return resolve_gguf(model_dir, progress=False) if model_dir.suffix == ".gguf" else model_dir
    if args.device == "cuda":
        args.model = f"random-weight llama, {args.model_shape} shape"
        return random_model.write_random_llama(tmp / args.model_shape, args.model_shape,
                                               DTYPES[args.dtype], device="cuda", seed=args.seed)
    return default_model_dir(progress=False)


def scaling(row: Row, base: Row) -> list[float]:
    """`row` over `base` on each seed's workload: the timed run's, then each repeat's."""
    return [row.tokens_per_s / base.tokens_per_s] + [
        a / b for a, b in zip(row.repeat_tokens_per_s or [], base.repeat_tokens_per_s or [],
                              strict=True)]


def seed_ratios(row: Row, base: Row, seed: int) -> str:
    """With --repeats: `row` over `base` on each seed's workload, and the median of those
    (one run's ratio varies by several percent from run to run on the same machine)."""
    if not (row.repeat_tokens_per_s and base.repeat_tokens_per_s):
        return ""
    ratios = scaling(row, base)
    each = ", ".join(f"{r:.2f}x" for r in ratios)
    return f" (seeds {seed}-{seed + len(ratios) - 1}: {each}; median {statistics.median(ratios):.2f}x)"


def run(args: argparse.Namespace, model_dir: Path) -> dict:
    vocab_size = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
    wl = make_workload(args, vocab_size)
    warm = device_warmup_workload(args, vocab_size)
    rows = []
    for tp in args.tensor_parallel_sizes:
        name = "pagedserve" if tp == 1 else f"pagedserve-tp{tp}"
        rows.append(measure(name, lambda tp=tp: ours(args, model_dir, tp), args, wl, None,
                            args.repeats))
    ours_rows = len(rows)
    for name in args.peers:
        rows.append(measure(name, lambda n=name: peer(n, args, model_dir), args, wl, warm))
    if ours_rows:  # none with `--tensor-parallel-sizes ''` (peers only): no ratios
        for r in rows[ours_rows:]:  # ours/peer: our TP rows are compared below instead
            r.ratio = rows[0].tokens_per_s / r.tokens_per_s if r.tokens_per_s else None
    print(common.format_table([asdict(r) for r in rows], COLUMNS))
    for r in rows[1:ours_rows]:
        print(f"{r.name} / {rows[0].name}: {r.tokens_per_s / rows[0].tokens_per_s:.2f}x"
              + seed_ratios(r, rows[0], args.seed))
    for r in rows[:ours_rows]:
        if r.first_over_steady is not None:
            print(f"{r.name}: first timed run on a fresh engine {r.tokens_per_s:.1f} tok/s = "
                  f"{r.first_over_steady:.1%} of the last ({r.steady_tokens_per_s:.1f} tok/s); "
                  f"kernel variants loaded per run: {r.kernel_variants_per_run}")
    for r in rows:
        if r.skipped:
            print(f"{r.name} skipped: {r.skipped}")
    peers = [r for r in rows[ours_rows:] if r.tokens_per_s]
    if peers and ours_rows:
        best = max(peers, key=lambda r: r.tokens_per_s)
        print(f"ours / fastest peer ({best.name}): {best.ratio:.2f}x")
    result = {
        "benchmark": "throughput", **common.environment(args.device),
        "model": args.model or str(model_dir),
        "dtype": args.dtype, "peak_memory": common.peak_memory_kind(args.device),
        "workload": {"num_prompts": args.num_prompts, "seed": args.seed, "ignore_eos": True,
                     "temperature": 0, "prompt_len": [args.min_prompt_len, args.max_prompt_len],
                     "output_len": list(args.output_range)},
        # ours: no warm-up run, only the engine's readiness warm-up (replicas/engine/warmup.py)
        "warmup": {"applies_to": "peers", "num_prompts": len(warm.prompts),
                   "output_len": [min(warm.output_lens), max(warm.output_lens)]},
        "repeats": args.repeats,
        "tensor_parallel_sizes": args.tensor_parallel_sizes,
        # each TP>1 row's tokens/s over TP=1's, seed by seed (the timed run's seed first)
        "tensor_parallel_scaling": {r.name: scaling(r, rows[0]) for r in rows[1:ours_rows]},
        "rows": [asdict(r) for r in rows],
    }
    common.write_results(result, args.out, {r.name: r.tokens_per_s for r in rows if r.tokens_per_s},
                         "output tokens / s")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
