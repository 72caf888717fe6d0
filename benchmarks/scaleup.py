"""Scale-up: time from the scale decision to a new replica's first served token, per phase.

    python benchmarks/scaleup.py                    # CPU, the embedded default model
    python benchmarks/scaleup.py --device cuda      # one GPU, a random-weight 1B-shaped Llama

One Ray cluster, one run: the node's weight store is filled first (as at app start), then new
replicas start alternately with their weights from the object store and from disk (the model's
files are dropped from the page cache before each disk start, with posix_fadvise, which needs no
root). "Decision" is the moment the replica actor is requested, as Serve's controller does on a
scale-up; the replica then runs the same start path as a Serve replica (`replicas.startup`):
weight fetch, engine process, weights, KV cache, CUDA graphs, one warm-up generation, and then
serves one request whose first token ends the measurement. Writes JSON and a timeline PNG.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

try:
    from benchmarks import common, random_model
except ModuleNotFoundError:  # run as `python benchmarks/scaleup.py`
    import common
    import random_model

from pagedserve.replicas.models.loader import safetensors_files
from pagedserve.replicas.models.registry import resolve_model_dir
from pagedserve.replicas.node.weight_store import WeightStores

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]


@ray.remote(num_cpus=0)
class StoreDirectory:
    """The router's weight-store calls, without the rest of the application."""

    def __init__(self, model: str | None, max_gib: float) -> None:
        self.stores = WeightStores("scaleup", model, max_gib)

    def weight_store(self, node_id: str):
        return self.stores.for_node(node_id)

    def forget_weight_store(self, node_id: str) -> None:
        self.stores.forget(node_id)


@ray.remote
class NewReplica:
    """A replica started on demand; `run` returns its phases up to the first served token."""

    async def run(self, config: dict, directory, decided_at: float) -> dict:
        actor_start = time.time() - decided_at  # the actor's process, up to this call
        from pagedserve.replicas.engine.startup_phases import PhaseTimer

        timer = PhaseTimer()
        timer.add("actor_start", actor_start)
        with timer.phase("replica_imports"):  # what a Serve replica imports before it starts
            from pagedserve.config import ClusterConfig
            from pagedserve.replicas import deployment  # noqa: F401
            from pagedserve.replicas.startup import start_engine
            from pagedserve.sampling_params import SamplingParams

            cluster = ClusterConfig(**config)
        engine, source = await start_engine(cluster, directory, timer)
        try:
            with timer.phase("warmup"):
                await _generate(engine, SamplingParams(temperature=0, max_tokens=4), "warmup")
            with timer.phase("first_token"):
                await _generate(engine, SamplingParams(temperature=0, max_tokens=1), "first")
        finally:
            await engine.shutdown()
        return {"weights_from": source, "phases": timer.phases,
                "decision_to_first_token_s": time.time() - decided_at}


async def _generate(engine, params, request_id: str) -> None:
    async for _ in await engine.add_request(PROMPT, params, request_id):
        break  # the first delta is the first token


def drop_page_cache(model_dir: Path) -> bool:
    """Ask the kernel to forget the weight files' cached pages; False where it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in safetensors_files(model_dir):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def start_replica(config: dict, directory, use_store: bool, num_gpus: float) -> dict:
    settings = {**config, "weight_store": {"max_gib": config["weight_store"]["max_gib"],
                                           "enabled": use_store}}
    decided_at = time.time()
    replica = NewReplica.options(num_cpus=1, num_gpus=num_gpus).remote()
    try:
        return ray.get(replica.run.remote(settings, directory, decided_at))
    finally:
        ray.kill(replica)


def run(args: argparse.Namespace) -> dict:
    model = args.model or (str(_random_model(args)) if args.device == "cuda" else None)
    model_dir = resolve_model_dir(model, progress=True)
    config = {"engine": {"model": model, "device": args.device, "max_num_seqs": 16,
                         "num_kvcache_blocks": args.kv_blocks},
              "torch_threads": args.torch_threads, "weight_store": {"max_gib": args.max_gib}}
    ray.init(num_cpus=max(4, os.cpu_count() or 4), include_dashboard=False,
             logging_level="warning")
    try:
        directory = StoreDirectory.remote(model, args.max_gib)
        started = time.perf_counter()
        store = ray.get(directory.weight_store.remote(ray.get_runtime_context().get_node_id()))
        store_stats = ray.get(store.stats.remote())
        store_stats["fill_s"] = time.perf_counter() - started
        runs, cache_dropped = [], False
        num_gpus = 1 if args.device == "cuda" else 0
        for i in range(args.repeats):
            for use_store in (False, True) if i % 2 == 0 else (True, False):
                if not use_store:
                    cache_dropped = drop_page_cache(model_dir)
                runs.append(start_replica(config, directory, use_store, num_gpus))
                print(f"{runs[-1]['weights_from']:>12}: "
                      f"{runs[-1]['decision_to_first_token_s']:.2f} s to the first token")
    finally:
        ray.shutdown()
    return {"benchmark": "scaleup", **common.environment(args.device), "model": str(model_dir),
            "page_cache_dropped": cache_dropped, "weight_store": store_stats,
            "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for source in ("object_store", "disk"):
        mine = [r for r in runs if r["weights_from"] == source]
        if not mine:
            continue
        phases = {p: statistics.median(r["phases"].get(p, 0.0) for r in mine)
                  for p in mine[0]["phases"]}
        out[source] = {"decision_to_first_token_s":
                       statistics.median(r["decision_to_first_token_s"] for r in mine),
                       "phases_s": phases}
    if "object_store" in out and "disk" in out:
        out["speedup"] = (out["disk"]["decision_to_first_token_s"]
                          / out["object_store"]["decision_to_first_token_s"])
    return out


def _random_model(args: argparse.Namespace) -> Path:
    out = Path(tempfile.mkdtemp(prefix="scaleup-")) / f"llama-{args.model_shape}"
    return random_model.write_random_llama(out, args.model_shape, device=args.device)


def print_table(summary: dict) -> None:
    phases = list(dict.fromkeys(p for s in ("disk", "object_store") if s in summary
                                for p in summary[s]["phases_s"]))
    rows = [{"phase": p, **{s: summary[s]["phases_s"].get(p) for s in ("disk", "object_store")
                            if s in summary}} for p in phases]
    rows.append({"phase": "decision -> first token",
                 **{s: summary[s]["decision_to_first_token_s"] for s in ("disk", "object_store")
                    if s in summary}})
    columns = [("phase", "phase", "s")] + [(s, f"{s} s", ".2f") for s in ("disk", "object_store")
                                           if s in summary]
    print(common.format_table(rows, columns))
    if "speedup" in summary:
        print(f"object store vs disk: {summary['speedup']:.2f}x faster")


def write_timeline(result: dict, out: Path) -> None:
    """Horizontal bars, one per run, split into its phases in the order they ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(9, 1 + 0.5 * len(runs)))
    colors: dict[str, tuple] = {}
    for row, r in enumerate(runs):
        left = 0.0
        for phase, seconds in r["phases"].items():
            first_use = phase not in colors
            color = colors.setdefault(phase, plt.get_cmap("tab20")(len(colors) % 20))
            ax.barh(row, seconds, left=left, color=color, label=phase if first_use else None)
            left += seconds
    ax.set_yticks(range(len(runs)), [f"{i}: {r['weights_from']}" for i, r in enumerate(runs)])
    ax.set_xlabel("seconds from the scale decision")
    ax.set_title(f"scale-up to first token ({result['device_name']})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(timeline_path(out))
    plt.close(fig)


def timeline_path(out: Path) -> Path:
    return out.with_name(out.stem + "-timeline.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", help="HF model dir or .gguf (default: the embedded model on cpu, "
                   "a random-weight model of --model-shape on cuda)")
    p.add_argument("--model-shape", choices=tuple(random_model.SHAPES), default="1b")
    p.add_argument("--repeats", type=int, default=2, help="starts per weight source")
    p.add_argument("--kv-blocks", type=int, default=None, help="fixed KV blocks (default: sized)")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--max-gib", type=float, default=16.0, help="weight store bound")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print_table(result["summary"])
    out = args.out or common.default_out("scaleup", args.device)
    bars = {s: v["decision_to_first_token_s"] for s, v in result["summary"].items()
            if isinstance(v, dict)}
    common.write_results(result, out, bars=bars, ylabel="decision to first token (s)")
    write_timeline(result, out)
    print(f"wrote {out}, {out.with_suffix('.png')} and {timeline_path(out)}")
    return result


if __name__ == "__main__":
    main()
