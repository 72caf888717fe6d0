"""The `pagedserve` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"pagedserve: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="Serve and run LLMs.")
    commands = parser.add_subparsers(title="commands")
    gen = commands.add_parser("generate", help="generate a completion for one prompt, offline")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--model", default=None, help="model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.set_defaults(run=_generate)
    srv = commands.add_parser("serve", help="serve the OpenAI API with Ray Serve (serve run)")
    srv.add_argument("--config", default=None,
                     help="a serve config file (default: the settings of ray_configs/local.yaml)")
    srv.add_argument("--model", default=None, help="model directory or .gguf file")
    srv.add_argument("--device", default=None, choices=["cpu", "cuda"])
    srv.add_argument("--num-replicas", type=int, default=None)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--haproxy", action="store_true",
                     help="Ray Serve's HAProxy mode: HAProxy on the HTTP port in front of every "
                     "ingress replica's own HTTP port (RAY_SERVE_ENABLE_HA_PROXY=1 for the "
                     "local Ray cluster `serve run` starts)")
    srv.set_defaults(run=_serve)
    graf = commands.add_parser("grafana", help="write the Grafana dashboard, or push it to Grafana")
    graf.add_argument("--out", type=Path, help="write the dashboard JSON to this file")
    graf.add_argument("--url", help="Grafana's base URL, e.g. http://grafana:3000")
    graf.add_argument("--token", help="a Grafana service-account token (Editor role); "
                      "default: $GRAFANA_TOKEN")
    graf.add_argument("--folder", help="the Grafana folder to put it in (made if missing)")
    graf.set_defaults(run=_grafana)
    chat = commands.add_parser("chat", help="chat in the terminal with a running server")
    chat.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    chat.add_argument("--model", default=None, help="default: the first model the server lists")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--api-key", default=None, help="sent as a bearer token (default: "
                      "$PAGEDSERVE_API_KEY or $OPENAI_API_KEY)")
    chat.set_defaults(run=_chat)
    bench = commands.add_parser("bench", help="run a benchmark")
    bench.set_defaults(run=lambda _: bench.print_help() or 2)
    kinds = bench.add_subparsers(title="benchmarks")
    serving = kinds.add_parser("serving", help="streaming clients with Poisson arrivals against "
                               "a running server: TTFT/TPOT/e2e percentiles, JSON and PNG")
    from pagedserve.bench.serving import add_arguments

    add_arguments(serving)
    serving.set_defaults(run=_bench_serving)
    return parser


# The same settings as ray_configs/local.yaml, for installs that have no checkout beside them.
LOCAL_APP = {"num_replicas": 1, "replica_num_cpus": 1, "torch_threads": 2,
             "engine": {"device": "cpu"}}


def _serve(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile

    import yaml

    if args.config is not None:
        config = yaml.safe_load(Path(args.config).read_text())
    else:
        config = {"http_options": {"host": args.host, "port": args.port},
                  "applications": [{"name": "pagedserve", "route_prefix": "/",
                                    "import_path": "pagedserve.cluster.app:build_app",
                                    "args": LOCAL_APP}]}
    app_args = config["applications"][0].setdefault("args", {})
    engine = app_args.setdefault("engine", {})
    for key, value in (("model", args.model), ("device", args.device)):
        if value is not None:
            engine[key] = value
    if args.num_replicas is not None:
        app_args["num_replicas"] = args.num_replicas
    serve_cli = shutil.which("serve") or os.path.join(os.path.dirname(sys.executable), "serve")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    from pagedserve.bench.serve_process import haproxy_mode_environment
    from pagedserve.replicas.node.warm_workers import preload_environment

    print(f"pagedserve: OpenAI API on http://{args.host}:{args.port}/v1 once ready (Ctrl-C stops)")
    # A local Ray started by `serve run` preloads Ray Serve into its workers (warm workers);
    # Serve reads its proxy mode from the environment Ray starts with.
    proxy_mode = haproxy_mode_environment() if args.haproxy else {}
    env = {**os.environ, **preload_environment(), **proxy_mode}
    return _wait_through_ctrl_c(_start_serve_run([serve_cli, "run", f.name], env))


def _start_serve_run(argv: list[str], env: dict[str, str]):
    import subprocess

    return subprocess.Popen(argv, env=env)


def _wait_through_ctrl_c(child) -> int:
    """The child's exit status. Ctrl-C reaches the child too (one process group), and it
    shuts Serve and its Ray down, so this process waits for that instead of exiting with a
    traceback; a second Ctrl-C makes `serve run` stop at once."""
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue


def _chat(args: argparse.Namespace) -> int:
    import contextlib

    from pagedserve.cli_chat import ChatSession, api_key_from_env, run_chat

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 (line editing and history for input())
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    session = ChatSession(args.url, args.model, args.system, args.max_tokens, args.temperature,
                          args.api_key or api_key_from_env())
    return run_chat(session)


def _bench_serving(args: argparse.Namespace) -> int:
    from pagedserve.bench.serving import run

    summary = run(args)
    return 0 if summary["errors"] == 0 else 1


def _grafana(args: argparse.Namespace) -> int:
    import os

    from pagedserve.cluster.grafana_dashboard import dashboard_json
    from pagedserve.cluster.grafana_push import GrafanaPushError, push_dashboard

    if args.out is None and args.url is None:
        raise ValueError("give --out FILE (write the dashboard) and/or --url URL (push it)")
    if args.out is not None:
        args.out.write_text(dashboard_json())
        print(f"pagedserve: dashboard written to {args.out}")
    if args.url is not None:
        token = args.token or os.environ.get("GRAFANA_TOKEN")
        if not token:
            raise ValueError("--url needs --token (or $GRAFANA_TOKEN)")
        try:
            result = push_dashboard(args.url, token, args.folder)
        except GrafanaPushError as err:
            print(f"pagedserve: error: {err}", file=sys.stderr)
            return 1
        print(f"pagedserve: dashboard pushed to {args.url.rstrip('/')}{result.get('url', '')}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pagedserve import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed)  # fail before loading
    llm = LLM(args.model, dtype=args.dtype)
    use_chat = not args.raw and llm.get_tokenizer().chat_template is not None
    if use_chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
