"""The `pagedserve` command line."""

from __future__ import annotations

import argparse
import sys


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
    return parser


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
