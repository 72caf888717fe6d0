"""Scale-up: time from the scale decision to a new replica's first served token, per path.

    python benchmarks/scaleup.py                    # CPU, the embedded default model
    python benchmarks/scaleup.py --device cuda      # one GPU, a random-weight 1B-shaped Llama

One Ray cluster, one run, every path next to `disk`:
- `decision_to_first_token_s` (the replica's own start, per phase), for `disk`,
  `object_store`, `standby_host` and `standby_device`: "decision" is the moment the replica
  actor is requested, as Serve's controller does on a scale-up; the replica then runs the same
  start path as a Serve replica (`replicas.startup`): a standby claimed from the node's pool
  (ready beforehand: that is the point of one), or a new engine process, then weights, KV
  cache, CUDA graphs, one warm-up generation, and one request whose first token ends the
  measurement. `object_store` is the weight store's path as configured for a GPU node: an
  `imported` standby (a process with its imports done, nothing on the device) loads the
  weights from the node's store; `disk` spawns an engine process that reads the files, which
  are dropped from the page cache before each start (posix_fadvise, no root needed). Every
  path runs with the node's warm Ray workers (`standby.warm_workers: 1`) under
  `RAY_preload_python_modules`, as `pagedserve serve` starts Ray; each run records whether its
  actor landed in one (`warm_worker`).
- `burst_to_first_token_s` (end to end through Serve and HTTP, `scaleup_burst`), for
  `--burst-paths` (default: parked and the standby paths).
Writes JSON (`summary[path]`) and a timeline PNG.
"""

from __future__ import annotations

import argparse
import json
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
from pagedserve.replicas.node.services import STANDBY_POOL, WEIGHT_STORE, NodeServices, find
from pagedserve.replicas.node.warm_workers import preload_environment

try:
    from benchmarks import scaleup_burst
    from benchmarks.scaleup_burst import STORE_PATHS, standby_mode
except ModuleNotFoundError:  # run as `python benchmarks/scaleup.py`
    import scaleup_burst
    from scaleup_burst import STORE_PATHS, standby_mode

DECISION_PATHS = ("disk", "object_store", "standby_host", "standby_device")
BURST_PATHS = ("parked", "standby_device", "standby_host")

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]


@ray.remote(num_cpus=0)
class Directory:
    """The router's node-service calls, without the rest of the application."""

    def __init__(self, app: str, model: str | None, max_gib: float | None,
                 standby: dict | None) -> None:
        store = {"max_gib": max_gib} if max_gib is not None else None
        self.services = NodeServices(app, model, store, standby, warm_workers=1)

    def ensure_node_services(self, node_id: str) -> bool:
        self.services.ensure(node_id)
        return True

    def forget_node_service(self, node_id: str, kind: str) -> None:
        self.services.forget(node_id, kind)


@ray.remote
class NewReplica:
    """A replica started on demand; `run` returns its phases up to the first served token."""

    async def run(self, config: dict, directory, app: str, decided_at: float) -> dict:
        actor_start = time.time() - decided_at  # the actor's process, up to this call
        import sys

        import psutil

        # A warm worker: a process older than the decision, with Ray Serve imported.
        warm = (psutil.Process().create_time() < decided_at
                and "ray.serve._private.replica" in sys.modules)
        from pagedserve.replicas.engine.startup_phases import PhaseTimer

        timer = PhaseTimer()
        timer.add("actor_start", actor_start)
        with timer.phase("replica_imports"):  # what a Serve replica imports before it starts
            from pagedserve.config import ClusterConfig
            from pagedserve.replicas import deployment  # noqa: F401
            from pagedserve.replicas.startup import start_engine
            from pagedserve.sampling_params import SamplingParams

            cluster = ClusterConfig(**config)
        engine, source = await start_engine(cluster, directory, timer, app_name=app,
                                            gpu_ids=[int(g) for g in ray.get_gpu_ids()])
        try:
            with timer.phase("warmup"):
                await _generate(engine, SamplingParams(temperature=0, max_tokens=4), "warmup")
            with timer.phase("first_token"):
                await _generate(engine, SamplingParams(temperature=0, max_tokens=1), "first")
            first_token_at = time.time()  # before the engine's shutdown, which is not the start
        finally:
            await engine.shutdown()
        return {"weights_from": source, "phases": timer.phases, "warm_worker": warm,
                "decision_to_first_token_s": first_token_at - decided_at}


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


def path_config(config: dict, path: str) -> dict:
    store = path == "object_store"
    mode = standby_mode(path)
    standby = {"per_node": 1, "mode": mode} if mode else {"per_node": 0}
    return {**config, "standby": standby,
            "weight_store": {"max_gib": config["weight_store"]["max_gib"], "enabled": store}}


def start_replica(config: dict, directory, app: str, num_gpus: float) -> dict:
    decided_at = time.time()
    replica = NewReplica.options(num_cpus=1, num_gpus=num_gpus).remote()
    try:
        return ray.get(replica.run.remote(config, directory, app, decided_at))
    finally:
        ray.kill(replica)


def wait_standby_ready(app: str, timeout_s: float = 600.0) -> dict:
    """A standby path's pool has one ready (it is made ahead of demand, before the decision);
    returns where the ready standby's weights came from."""
    deadline = time.monotonic() + timeout_s
    node = ray.get_runtime_context().get_node_id()
    while time.monotonic() < deadline:
        pool = find(app, node, STANDBY_POOL)
        stats = ray.get(pool.stats.remote()) if pool is not None else {"ready": 0}
        if stats["ready"] >= 1:
            return next(iter(stats["weights"].values()))
        time.sleep(0.2)
    raise TimeoutError(f"no standby of {app} was ready in {timeout_s:.0f} s")


def directories(model: str | None, max_gib: float, config: dict, paths: list[str]) -> dict:
    """One service directory per path (each standby mode has its own pool), started now."""
    out, node = {}, ray.get_runtime_context().get_node_id()
    for path in paths:
        app = f"scaleup-{path}"
        standby = None
        if standby_mode(path):
            standby = {"engine": config["engine"], "per_node": 1, "mode": standby_mode(path)}
        store_gib = max_gib if path in STORE_PATHS else None  # one copy in the store
        out[path] = (app, Directory.remote(app, model, store_gib, standby))
        ray.get(out[path][1].ensure_node_services.remote(node))
    return out


def run(args: argparse.Namespace, progress: Path | None = None) -> dict:
    """Every path's starts, then the bursts. With `progress`, what has been measured so far is
    rewritten there after each start and burst, so a run cut short still leaves its figures."""
    model = args.model or (str(_random_model(args)) if args.device == "cuda" else None)
    model_dir = resolve_model_dir(model, progress=True)
    config = {"engine": {"model": model, "device": args.device, "max_num_seqs": args.max_num_seqs,
                         "num_kvcache_blocks": args.kv_blocks},
              "torch_threads": args.torch_threads, "weight_store": {"max_gib": args.max_gib}}
    paths = [p for p in args.paths.split(",") if p]
    os.environ.update(preload_environment())  # as `pagedserve serve` starts Ray
    ray.init(num_cpus=max(4, os.cpu_count() or 4), include_dashboard=False,
             logging_level="warning")
    try:
        dirs = directories(model, args.max_gib, config, paths)
        store_stats = {}
        store_paths = [p for p in STORE_PATHS if p in dirs]
        if store_paths:
            started = time.perf_counter()
            store = find(dirs[store_paths[0]][0], ray.get_runtime_context().get_node_id(),
                         WEIGHT_STORE)
            store_stats = ray.get(store.stats.remote())
            store_stats["fill_s"] = time.perf_counter() - started
        runs, cache_dropped = [], False
        num_gpus = 1 if args.device == "cuda" else 0
        for i in range(args.repeats):
            for path in paths if i % 2 == 0 else reversed(paths):
                app, directory = dirs[path]
                if path == "disk":
                    cache_dropped = drop_page_cache(model_dir)
                standby_weights = wait_standby_ready(app) if standby_mode(path) else None
                scaleup_burst.wait_warm_worker()
                runs.append({"path": path, **start_replica(path_config(config, path), directory,
                                                           app, num_gpus)})
                if standby_weights is not None:
                    runs[-1]["standby_weights"] = standby_weights
                phases = ", ".join(f"{k} {v:.2f}" for k, v in runs[-1]["phases"].items())
                print(f"{path:>15}: {runs[-1]['decision_to_first_token_s']:.2f} s to the "
                      f"first token (engine from {runs[-1]['weights_from']}, warm worker "
                      f"{runs[-1]['warm_worker']}): {phases}", flush=True)
                save_progress(progress, runs, {})
        for directory in dirs.values():
            ray.kill(directory[1])
        bursts = {}
        for path in [p for p in args.burst_paths.split(",") if p]:
            burst_args = scaleup_burst.app_args(
                {**config["engine"]}, path, args.torch_threads, num_gpus / 4 if num_gpus else 0,
                args.max_gib)
            bursts[path] = scaleup_burst.run_path(path, burst_args, args.repeats, PROMPT)
            print(f"{path:>15}: {bursts[path]['burst_to_first_token_s']:.2f} s from the burst "
                  "to the new capacity's first token", flush=True)
            save_progress(progress, runs, bursts)
    finally:
        ray.shutdown()
    return {"benchmark": "scaleup", **common.environment(args.device), "model": str(model_dir),
            "page_cache_dropped": cache_dropped, "weight_store": store_stats,
            "runs": runs, "bursts": bursts, "summary": summarize(runs, bursts)}


def save_progress(progress: Path | None, runs: list[dict], bursts: dict) -> None:
    if progress is not None:
        partial = {"benchmark": "scaleup", "partial": True, "runs": runs, "bursts": bursts,
                   "summary": summarize(runs, bursts)}
        progress.write_text(json.dumps(partial, indent=1, default=str))


def progress_path(out: Path) -> Path:
    return out.with_name(out.stem + "-partial.json")


def summarize(runs: list[dict], bursts: dict | None = None) -> dict:
    """Per path: medians of `decision_to_first_token_s` and its phases, and of
    `burst_to_first_token_s`; each path's ratio to `disk`."""
    out: dict = {}
    for path in dict.fromkeys(r["path"] for r in runs):
        mine = [r for r in runs if r["path"] == path]
        phases = {p: statistics.median(r["phases"].get(p, 0.0) for r in mine)
                  for p in mine[0]["phases"]}
        out[path] = {"decision_to_first_token_s":
                     statistics.median(r["decision_to_first_token_s"] for r in mine),
                     "decision_to_first_token_all_s":
                     [r["decision_to_first_token_s"] for r in mine],
                     "phases_s": phases}
    for path, burst in (bursts or {}).items():
        out.setdefault(path, {})["burst_to_first_token_s"] = burst["burst_to_first_token_s"]
        out[path]["burst_to_first_token_all_s"] = burst["burst_to_first_token_all_s"]
    disk = out.get("disk", {}).get("decision_to_first_token_s")
    for row in out.values():
        if disk and "decision_to_first_token_s" in row:
            row["speedup_vs_disk"] = disk / row["decision_to_first_token_s"]
    return out


def _random_model(args: argparse.Namespace) -> Path:
    out = Path(tempfile.mkdtemp(prefix="scaleup-")) / f"llama-{args.model_shape}"
    return random_model.write_random_llama(out, args.model_shape, device=args.device)


def print_table(summary: dict) -> None:
    paths = list(summary)
    phases = list(dict.fromkeys(p for s in paths for p in summary[s].get("phases_s", {})))
    rows = [{"phase": p, **{s: summary[s].get("phases_s", {}).get(p) for s in paths}}
            for p in phases]
    for key, label in (("decision_to_first_token_s", "decision -> first token"),
                       ("burst_to_first_token_s", "burst -> first token (HTTP)"),
                       ("speedup_vs_disk", "speedup vs disk (decision)")):
        rows.append({"phase": label, **{s: summary[s].get(key) for s in paths}})
    columns = [("phase", "phase", "s")] + [(s, s, ".2f") for s in paths]
    print(common.format_table(rows, columns))


def write_timeline(result: dict, out: Path) -> None:
    """Horizontal bars, one per run, split into its phases in the order they ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.5 * len(runs)))
    colors: dict[str, tuple] = {}
    for row, r in enumerate(runs):
        left = 0.0
        for phase, seconds in r["phases"].items():
            first_use = phase not in colors
            color = colors.setdefault(phase, plt.get_cmap("tab20")(len(colors) % 20))
            ax.barh(row, seconds, left=left, color=color, label=phase if first_use else None)
            left += seconds
    ax.set_yticks(range(len(runs)), [f"{i}: {r['path']}" for i, r in enumerate(runs)])
    ax.set_xlabel("seconds from the scale decision")
    ax.set_title(f"scale-up to first token ({result['device_name']})")
    # Outside the axes, so the legend never covers a bar.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
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
    p.add_argument("--repeats", type=int, default=3, help="starts per path")
    p.add_argument("--paths", default=",".join(DECISION_PATHS),
                   help="replica-start paths to time (comma-separated)")
    p.add_argument("--burst-paths", default=",".join(BURST_PATHS),
                   help="end-to-end paths through Serve and HTTP ('' for none)")
    p.add_argument("--max-num-seqs", type=int, default=4,
                   help="per replica; a burst is this plus one request")
    p.add_argument("--kv-blocks", type=int, default=None, help="fixed KV blocks (default: sized)")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--max-gib", type=float, default=16.0, help="weight store bound")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = common.default_out("scaleup", args.device, args.out)  # before the run, not after
    result = run(args, progress_path(out))
    progress_path(out).unlink(missing_ok=True)
    print_table(result["summary"])
    bars = {s: v["decision_to_first_token_s"] for s, v in result["summary"].items()
            if "decision_to_first_token_s" in v}
    common.write_results(result, out, bars=bars, ylabel="decision to first token (s)")
    write_timeline(result, out)
    print(f"wrote {out}, {out.with_suffix('.png')} and {timeline_path(out)}")
    return result


if __name__ == "__main__":
    main()
