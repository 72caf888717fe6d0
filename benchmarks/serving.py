"""Serving latency and throughput over HTTP: concurrent streaming clients, Poisson arrivals.

    python benchmarks/serving.py                                   # CPU: ray_configs/local.yaml
    python benchmarks/serving.py --engine-direct --request-rate inf
    python benchmarks/serving.py --device cuda --config ray_configs/gpu.yaml --num-replicas 1 \
        --engine-direct --request-rate inf                          # 1B-shaped random model
    python benchmarks/serving.py --sweep                            # rates up to saturation

It starts `serve run` on the config (unless `--url` points at a running server), sends the same
workload as `throughput.py` (same flags, same seed, so the same prompts) as streamed completions,
and prints TTFT, time per output token and end-to-end latency percentiles plus throughput. With
`--engine-direct` it first runs `throughput.py` on our engine alone in a child process (so its
memory is gone before the server starts) and reports HTTP throughput as a share of it. Both
sides get the same untimed warm-up first (throughput.py's, longer on cuda). `--repeats N` makes
N saturation runs on N seeds' workloads on both sides and prints each run's share: the first
timed run on a fresh server and the steady state.

The client processes start together (a barrier, then one common start time); each run reports
the arrival rate achieved beside the one asked for, how late requests left against their
schedule, and the clients' CPU time, so a client that cannot keep up shows. `--sweep` runs one
saturation run (all requests at once), then Poisson rates at fractions of the request rate it
sustained (or the rates given), and prints and plots TTFT / TPOT / e2e p50 and p99 per rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import transformers
import yaml

from pagedserve.bench.serve_process import stop_serve_run
from pagedserve.bench.serving_client import STALL_TIMEOUT_S, run_client_processes
from pagedserve.bench.serving_stats import poisson_offsets, summarize

try:
    from benchmarks import common, random_model, throughput
except ModuleNotFoundError:  # run as `python benchmarks/serving.py`
    import common
    import random_model
    import throughput

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
WORKLOAD_FLAGS = ("num_prompts", "min_prompt_len", "max_prompt_len", "output_len", "seed")
SWEEP_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 0.9, 1.0)  # of the saturation run's request rate
LATENCIES = ("ttft_s", "tpot_s", "e2e_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "ray_configs" / "local.yaml")
    p.add_argument("--url", help="drive this running server instead of starting one")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="picks throughput.py's default workload and model for this device")
    p.add_argument("--model", help="model dir (default: the config's, or a random --model-shape "
                   "model on cuda)")
    p.add_argument("--model-shape", choices=tuple(random_model.SHAPES), default="1b")
    p.add_argument("--num-replicas", type=int, help="override the config's num_replicas")
    for flag in WORKLOAD_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (inf: all at once)")
    p.add_argument("--clients", type=int, default=4, help="client processes")
    p.add_argument("--sweep", nargs="?", const="auto", type=sweep_rates,
                   help="run several request rates: comma-separated requests/s, or without a "
                   "value fractions of the rate an all-at-once run sustains")
    p.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT_S,
                   help="seconds a request may receive nothing before it ends with an error")
    p.add_argument("--engine-direct", action="store_true",
                   help="also measure our engine offline on the same workload, first")
    p.add_argument("--repeats", type=int, default=1,
                   help="saturation runs, each on the next seed's workload (as throughput.py's "
                   "--repeats, which the engine-direct run gets too): the first and the last")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.sweep and args.repeats > 1:
        p.error("--repeats applies to saturation runs; --sweep runs one of its own")
    args.out = common.default_out("serving", args.device, args.out)
    return args


def sweep_rates(value: str) -> str | list[float]:
    if value == "auto":
        return value
    try:
        rates = [float(r) for r in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep takes comma-separated rates, got {value!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--sweep rates must be > 0 (or inf), got {value!r}")
    return rates


def throughput_argv(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """throughput.py flags for the same workload, so both benchmarks draw the same prompts."""
    argv = ["--device", args.device, "--model", str(model_dir), "--peers", "",
            "--repeats", str(args.repeats)]
    for flag in WORKLOAD_FLAGS:
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return argv


def engine_direct(args: argparse.Namespace, model_dir: Path, tmp: Path) -> list[float]:
    """Our engine's tok/s on each seed's workload: the first timed run, then each repeat."""
    out = tmp / "engine-direct.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"),
           *throughput_argv(args, model_dir), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO)
    row = json.loads(out.read_text())["rows"][0]
    return [row["tokens_per_s"], *(row.get("repeat_tokens_per_s") or [])]


def server_config(args: argparse.Namespace, model_dir: Path, targs, tmp: Path) -> Path:
    config = yaml.safe_load(args.config.read_text())
    app_args = config["applications"][0].setdefault("args", {})
    engine = app_args.setdefault("engine", {})
    if args.model or args.device == "cuda":
        engine["model"] = str(model_dir)
    if args.device == "cuda":  # as throughput.py configures our engine for this workload
        engine["max_model_len"] = targs.max_prompt_len + targs.output_range[1]
    if args.num_replicas:
        app_args["num_replicas"] = args.num_replicas
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_server(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", str(config)],
                                cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve run exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get("http://127.0.0.1:8000/readyz", timeout=2).status_code == 200:
                print(f"server ready ({log})", flush=True)
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit("server not ready after 900 s")


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C `serve run` and end what is left of its Ray cluster (no other cluster's)."""
    stop_serve_run(proc)


def drive(url: str, model: str, workload, rate: float, clients: int, seed: int,
          stall_timeout_s: float = STALL_TIMEOUT_S) -> dict:
    """One run at `rate`; its summary plus the clients' CPU time and the rate asked for."""
    n = len(workload.prompts)
    offsets = poisson_offsets(n, rate, seed)
    jobs = [(offsets[i], workload.prompts[i], workload.output_lens[i]) for i in range(n)]
    runs, _ = run_client_processes(url, model, [jobs[i::clients] for i in range(clients)],
                                   stall_timeout_s=stall_timeout_s)
    summary = summarize([o for run in runs for o in run.outcomes])
    wall = max(summary["wall_s"], 1e-9)
    # As each run ends, so a run cut short by a time limit still shows how far it got.
    print(f"rate {rate:g}/s: {summary['requests']} requests, {summary['errors']} errors, "
          f"{summary['tokens_per_s']:.1f} tok/s, {summary['wall_s']:.1f} s", flush=True)
    return {"request_rate": rate, **summary,
            "client_cpu_s": sum(run.cpu_s for run in runs),
            "client_busiest_cpu_share": max(run.cpu_s for run in runs) / wall}


def sweep(url: str, model: str, workload, args: argparse.Namespace, seed: int) -> list[dict]:
    """The saturation run first (all at once), then each rate; rows in that order."""
    rows = [drive(url, model, workload, float("inf"), args.clients, seed, args.stall_timeout)]
    rates = args.sweep
    if rates == "auto":
        rates = [f * rows[0]["requests_per_s"] for f in SWEEP_FRACTIONS]
    for rate in rates:
        if math.isfinite(rate):
            rows.append(drive(url, model, workload, rate, args.clients, seed,
                              args.stall_timeout))
    return rows


def print_sweep(rows: list[dict]) -> None:
    table = []
    for row in rows:
        entry = {"rate": row["request_rate"], "achieved": row["achieved_rate_per_s"],
                 "tok_s": row["tokens_per_s"], "errors": row["errors"],
                 "cpu": row["client_busiest_cpu_share"]}
        for key in LATENCIES:
            for q in ("p50", "p99"):
                entry[f"{key[:-2]}_{q}"] = row[key].get(q, float("nan"))
        table.append(entry)
    columns = [("rate", "rate (req/s)", ".2f"), ("achieved", "achieved", ".2f"),
               ("tok_s", "tok/s", ".1f"), ("errors", "errors", "d"),
               ("cpu", "client CPU", ".0%")]
    columns += [(f"{k[:-2]}_{q}", f"{k[:-2]} {q} (s)", ".3f")
                for k in LATENCIES for q in ("p50", "p99")]
    print(common.format_table(table, columns))


def plot_sweep(rows: list[dict], path: Path) -> Path | None:
    """Latency p50 and p99 against the achieved request rate; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = sorted((r for r in rows if math.isfinite(r["achieved_rate_per_s"])),
                  key=lambda r: r["achieved_rate_per_s"])
    fig, axes = plt.subplots(1, len(LATENCIES), figsize=(4 * len(LATENCIES), 3.5))
    for ax, key in zip(axes, LATENCIES, strict=True):
        for q in ("p50", "p99"):
            ax.plot([r["achieved_rate_per_s"] for r in rows],
                    [r[key].get(q, float("nan")) for r in rows], marker="o", label=q)
        ax.set_xlabel("achieved request rate (req/s)")
        ax.set_ylabel(f"{key[:-2]} (s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def print_report(summary: dict, direct: float | None) -> None:
    rows = [{"metric": key, **summary[key]} for key in LATENCIES if summary[key]]
    columns = [("metric", "latency (s)", "s")] + [(k, k, ".3f") for k in ("mean", "p50", "p90", "p99")]
    print(common.format_table(rows, columns))
    print(f"{summary['requests']} requests, {summary['errors']} errors, "
          f"{summary['output_tokens']} output tokens in {summary['wall_s']:.2f} s: "
          f"{summary['tokens_per_s']:.1f} tok/s over HTTP")
    lag = summary["send_lag_s"].get("p99", 0.0)
    print(f"arrivals: {summary['achieved_rate_per_s']:.2f} req/s achieved for "
          f"{summary['request_rate']} asked (send lag p99 {lag * 1000:.1f} ms); clients: "
          f"{summary['client_cpu_s']:.1f} CPU s, the busiest at "
          f"{summary['client_busiest_cpu_share']:.0%} of a core")
    if direct:
        print(f"engine direct: {direct:.1f} tok/s; HTTP / direct = "
              f"{summary['tokens_per_s'] / direct:.1%}")


def repeat_rows(runs: list[dict], direct: list[float] | None, seed: int) -> list[dict]:
    """One row per saturation run: its seed, HTTP tok/s and, with engine direct, the share."""
    rows = []
    for i, run in enumerate(runs):
        engine = direct[i] if direct and i < len(direct) else None
        rows.append({"run": i, "seed": seed + i, "http_tokens_per_s": run["tokens_per_s"],
                     "errors": run["errors"], "ttft_p50_s": run["ttft_s"].get("p50"),
                     "engine_direct_tokens_per_s": engine,
                     "http_over_direct": run["tokens_per_s"] / engine if engine else None})
    return rows


def print_repeats(rows: list[dict]) -> None:
    columns = [("run", "run", "d"), ("seed", "seed", "d"), ("http_tokens_per_s", "HTTP tok/s", ".1f"),
               ("errors", "errors", "d"), ("ttft_p50_s", "TTFT p50 (s)", ".3f"),
               ("engine_direct_tokens_per_s", "direct tok/s", ".1f"),
               ("http_over_direct", "HTTP / direct", ".1%")]
    print(common.format_table(rows, columns))
    print("run 0 is the first timed run on this server (after the warm-up), the last is the "
          "steady state")


def saturation_runs(url: str, model: str, targs, vocab: int, args) -> list[dict]:
    """`--repeats` runs at `--request-rate`, run i on the workload of seed + i."""
    runs = []
    for i in range(args.repeats):
        workload = throughput.make_workload(targs, vocab, seed=targs.seed + i)
        runs.append(drive(url, model, workload, args.request_rate, args.clients, targs.seed,
                          args.stall_timeout))
    return runs


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pagedserve-serving-") as tmp:
        tmp = Path(tmp)
        model_dir = model_directory(args, tmp)
        targs = throughput.parse_args(throughput_argv(args, model_dir))
        vocab = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
        workload = throughput.make_workload(targs, vocab)
        direct = engine_direct(args, model_dir, tmp) if args.engine_direct else None
        proc = None if args.url else start_server(
            server_config(args, model_dir, targs, tmp), tmp / "serve.log")
        url = args.url or "http://127.0.0.1:8000"
        try:
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            # the warm-up engine direct had (throughput.py's), so both first runs compare
            warm = throughput.device_warmup_workload(targs, vocab)
            drive(url, model, warm, float("inf"), args.clients, targs.seed)
            if args.sweep:
                rows = sweep(url, model, workload, args, targs.seed)
            else:
                rows = saturation_runs(url, model, targs, vocab, args)
        finally:
            if proc is not None:
                stop_server(proc)
    summary = rows[0]
    print_report(summary, direct[0] if direct else None)
    result = {"benchmark": "serving", **common.environment(args.device),
              "config": str(args.config), "model": str(args.model or model_dir),
              "clients": args.clients,
              "workload": {f: getattr(targs, f, None) for f in WORKLOAD_FLAGS},
              "engine_direct_tokens_per_s": direct[0] if direct else None, **summary}
    if args.sweep:
        print_sweep(rows)
        result["sweep"] = rows
    elif args.repeats > 1:
        result["repeats"] = repeat_rows(rows, direct, targs.seed)
        print_repeats(result["repeats"])
    bars = {"HTTP": summary["tokens_per_s"], **({"engine direct": direct[0]} if direct else {})}
    common.write_results(result, args.out, bars, "output tokens / s")
    if args.sweep and (png := plot_sweep(rows, args.out.with_name(args.out.stem + "-sweep.png"))):
        print(f"wrote {png}")
    print(f"wrote {args.out}")
    return result


def model_directory(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.device == "cuda":
        import torch

        return random_model.write_random_llama(tmp / args.model_shape, args.model_shape,
                                               torch.bfloat16, device="cuda", seed=args.seed or 0)
    from pagedserve.replicas.models.registry import resolve_model_dir

    engine = yaml.safe_load(args.config.read_text())["applications"][0]["args"].get("engine", {})
    return resolve_model_dir(engine.get("model"), progress=False)


if __name__ == "__main__":
    main()
