"""Prefix routing: our router against Serve's default request router, in the same run.

    python benchmarks/prefix_routing.py --device cuda     # 2 replicas on one GPU, 1B-shape model
    python benchmarks/prefix_routing.py --groups 4 --per-group 4 --prefix-len 256 \\
        --suffix-len 32 --contexts 2 --questions 4 --context-len 512 --question-len 64 \\
        --output-len 16                                    # CPU: the default model, small sizes

It starts `serve run` once per router policy, the config otherwise the same: `admission` (ours:
the router actor's late-bound admission with prefix affinity) and `serve` (Serve's default
power-of-two-choices request router, bounded by the replicas' `max_ongoing_requests`). Each
server has two replicas: on cuda half a GPU each (`gpu_memory_utilization` 0.45) and a random
1B-shape model, as serving.py uses; on cpu the config's model, one torch thread each. Each server gets the same
untimed warm-up (throughput.py's), then runs two workloads (`prefix_workloads.py`): `prefix`
(groups sharing a prefix, vLLM's PrefixRepetition shape) and `long_context` (a few long
contexts, many questions each), streamed token-id completions all at once (or at
--request-rate). Per policy and workload: output tok/s, TTFT p50/p90/p99, errors, and the
token-level prefix-cache hit rate: hit tokens / prompt tokens looked up, summed over both
replicas, from the engines' totals (which replicas report to the router) before and after.
The table puts both policies side by side with ours/serve tok/s and serve/ours TTFT p90.

On cuda each replica's KV cache is fixed (`--kv-cache-gib`): our engine sizes its cache from
total memory times `gpu_memory_utilization` minus all other use of the GPU, and two replicas
starting together on one GPU would each count the other's memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import transformers
import yaml

from pagedserve.bench.serve_process import joined_cluster
from pagedserve.bench.serving_client import STALL_TIMEOUT_S

try:
    from benchmarks import common, serving, throughput
    from benchmarks.prefix_workloads import SharedPrefixShape, best_hit_rate, shared_prefix_workload
except ModuleNotFoundError:  # run as `python benchmarks/prefix_routing.py`
    import common
    import serving
    import throughput
    from prefix_workloads import SharedPrefixShape, best_hit_rate, shared_prefix_workload

REPO = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8000"
POLICIES = ("admission", "serve")
APP = "pagedserve"
SETTLE_S, SETTLE_TIMEOUT_S = 1.5, 15.0  # replicas report their totals at least every second


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "ray_configs" / "local.yaml")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", help="model dir (default: the config's; on cuda a random model)")
    p.add_argument("--model-shape", choices=tuple(serving.random_model.SHAPES), default="1b")
    p.add_argument("--kv-cache-gib", type=float, default=16.0, help="per replica, on cuda")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--per-group", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=128)
    p.add_argument("--contexts", type=int, default=4)
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--context-len", type=int, default=4096)
    p.add_argument("--question-len", type=int, default=500)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--workloads", default="prefix,long_context")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--clients", type=int, default=4, help="client processes")
    p.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT_S)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.policies = args.policies.split(",")
    args.workloads = args.workloads.split(",")
    if bad := [x for x in args.policies if x not in POLICIES]:
        p.error(f"--policies takes {', '.join(POLICIES)}; got {bad}")
    if bad := [x for x in args.workloads if x not in ("prefix", "long_context")]:
        p.error(f"--workloads takes prefix, long_context; got {bad}")
    args.out = common.default_out("prefix-routing", args.device, args.out)
    return args


def shapes(args: argparse.Namespace) -> dict[str, SharedPrefixShape]:
    every = {"prefix": SharedPrefixShape(args.groups, args.per_group, args.prefix_len,
                                         args.suffix_len, args.output_len),
             "long_context": SharedPrefixShape(args.contexts, args.questions, args.context_len,
                                               args.question_len, args.output_len)}
    return {name: every[name] for name in args.workloads}


def server_config(args: argparse.Namespace, model_dir: Path, policy: str, max_len: int,
                  tmp: Path) -> Path:
    """The config file with two replicas and `router.policy`; on cuda, both on one GPU."""
    config = yaml.safe_load(args.config.read_text())
    app_args = config["applications"][0].setdefault("args", {})
    engine = app_args.setdefault("engine", {})
    app_args["num_replicas"] = 2
    app_args.setdefault("router", {})["policy"] = policy
    if args.model or args.device == "cuda":
        engine["model"] = str(model_dir)
    engine["max_model_len"] = max_len
    if args.device == "cpu":  # two replicas share the machine's cores
        app_args["torch_threads"] = 1
    if args.device == "cuda":
        app_args["replica_num_gpus"] = 0.5
        engine.update(device="cuda", dtype="bfloat16", gpu_memory_utilization=0.45,
                      num_kvcache_blocks=kv_blocks(model_dir, args.kv_cache_gib,
                                                   engine.get("block_size", 16)))
    path = tmp / f"serve-{policy}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def kv_blocks(model_dir: Path, gib: float, block_size: int) -> int:
    """KV-cache blocks of `block_size` tokens in `gib` for the model (bf16 keys and values)."""
    c = transformers.AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_block = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * block_size * 2
    return int(gib * 2**30 // per_block)


def prefix_totals(router) -> tuple[int, int]:
    """(prompt tokens looked up, found) in the prefix caches, summed over the replicas, once
    two readings SETTLE_S apart agree (the replicas' last reports are in)."""
    deadline, last = time.monotonic() + SETTLE_TIMEOUT_S, None
    while True:
        replicas = router.stats.remote().result(timeout_s=30)["replicas"].values()
        now = (sum(r["prefix_queried_tokens"] for r in replicas),
               sum(r["prefix_hit_tokens"] for r in replicas))
        if now == last or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(SETTLE_S)


def measure(args, model: str, router, name: str, shape: SharedPrefixShape, vocab: int) -> dict:
    """One workload on the running server: the client summary plus the prefix hit rate."""
    workload = shared_prefix_workload(shape, vocab, args.seed)
    before = prefix_totals(router)
    summary = serving.drive(URL, model, workload, args.request_rate, args.clients, args.seed,
                            args.stall_timeout)
    after = prefix_totals(router)
    queried, hits = after[0] - before[0], after[1] - before[1]
    return {"workload": name, **summary, "prompt_tokens": shape.prompt_len * len(workload.prompts),
            "prefix_queried_tokens": queried, "prefix_hit_tokens": hits,
            "prefix_hit_rate": hits / queried if queried else None}


def run_policy(args, policy: str, model_dir: Path, vocab: int, tmp: Path) -> list[dict]:
    """Start the server with `policy`, warm it up, run each workload; the server is stopped."""
    every = shapes(args)
    max_len = max(s.prompt_len for s in every.values()) + args.output_len
    config = server_config(args, model_dir, policy, max_len, tmp)
    proc = serving.start_server(config, tmp / f"serve-{policy}.log")
    try:
        with joined_cluster(proc):
            from ray import serve

            router = serve.get_deployment_handle("Router", app_name=APP)
            model = httpx.get(f"{URL}/v1/models", timeout=30).json()["data"][0]["id"]
            warm = throughput.device_warmup_workload(warmup_args(args, max_len), vocab)
            serving.drive(URL, model, warm, float("inf"), args.clients, args.seed)
            return [{"policy": policy, **measure(args, model, router, name, shape, vocab)}
                    for name, shape in every.items()]
    finally:
        serving.stop_server(proc)


def warmup_args(args: argparse.Namespace, max_len: int) -> argparse.Namespace:
    """throughput.py's arguments for its warm-up: prompts up to the workloads' length."""
    return throughput.parse_args(["--device", args.device, "--num-prompts", "32",
                                  "--min-prompt-len", str(args.suffix_len),
                                  "--max-prompt-len", str(max_len - args.output_len),
                                  "--output-len", str(args.output_len), "--seed", str(args.seed)])


def comparisons(rows: list[dict]) -> list[dict]:
    """Per workload run under both policies: ours/serve tok/s, serve/ours TTFT p90."""
    found = {(r["workload"], r["policy"]): r for r in rows}
    out = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        ours, theirs = found.get((workload, "admission")), found.get((workload, "serve"))
        if ours is None or theirs is None:
            continue
        p90 = ours["ttft_s"].get("p90"), theirs["ttft_s"].get("p90")
        out.append({"workload": workload,
                    "tok_s_ratio": _ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
                    "ttft_p90_ratio": _ratio(p90[1], p90[0]),
                    "hit_rate_ours": ours["prefix_hit_rate"],
                    "hit_rate_serve": theirs["prefix_hit_rate"]})
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def print_tables(rows: list[dict], ratios: list[dict], best: dict[str, float]) -> None:
    table = [{"workload": r["workload"], "policy": r["policy"], "requests": r["requests"],
              "errors": r["errors"], "tok_s": r["tokens_per_s"],
              **{f"ttft_{q}": r["ttft_s"].get(q) for q in ("p50", "p90", "p99")},
              "hit": r["prefix_hit_rate"], "best": best[r["workload"]]} for r in rows]
    print(common.format_table(table, [
        ("workload", "workload", "s"), ("policy", "router", "s"), ("requests", "requests", "d"),
        ("errors", "errors", "d"), ("tok_s", "output tok/s", ".1f"),
        ("ttft_p50", "TTFT p50 (s)", ".3f"), ("ttft_p90", "TTFT p90 (s)", ".3f"),
        ("ttft_p99", "TTFT p99 (s)", ".3f"), ("hit", "prefix hit", ".1%"),
        ("best", "best hit", ".1%")]))
    print(common.format_table(ratios, [
        ("workload", "workload", "s"), ("tok_s_ratio", "tok/s ours/serve", ".2f"),
        ("ttft_p90_ratio", "TTFT p90 serve/ours", ".2f"),
        ("hit_rate_ours", "hit ours", ".1%"), ("hit_rate_serve", "hit serve", ".1%")]))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    every = shapes(args)
    with tempfile.TemporaryDirectory(prefix="pagedserve-prefix-routing-") as tmp:
        tmp = Path(tmp)
        model_dir = serving.model_directory(args, tmp)
        vocab = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
        block = yaml.safe_load(args.config.read_text())["applications"][0].get("args", {})
        block_size = block.get("engine", {}).get("block_size", 16)
        rows = [row for policy in args.policies
                for row in run_policy(args, policy, model_dir, vocab, tmp)]
    best = {name: best_hit_rate(shape, block_size) for name, shape in every.items()}
    ratios = comparisons(rows)
    print_tables(rows, ratios, best)
    result = {"benchmark": "prefix-routing", **common.environment(args.device),
              "config": str(args.config), "model": str(args.model or model_dir),
              "clients": args.clients, "request_rate": args.request_rate,
              "shapes": {n: vars(s) for n, s in every.items()}, "best_hit_rate": best,
              "rows": rows, "comparisons": ratios}
    bars = {f"{r['workload']} {r['policy']}": r["tokens_per_s"] for r in rows}
    common.write_results(result, args.out, bars, "output tokens / s")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
