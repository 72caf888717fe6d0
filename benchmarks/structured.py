"""Structured outputs' cost: throughput with a JSON schema on every request against none.

    python benchmarks/structured.py                  # CPU, the embedded default model
    python benchmarks/structured.py --device cuda    # one GPU

Same prompts, same seeds, in one engine: a warm-up round of each, then `--rounds` alternating
rounds of unconstrained and schema-constrained generation. Output tok/s = generated tokens /
wall time of the round (a constrained answer ends when its JSON is complete, so its rounds
generate fewer tokens; the rate is what compares). Prints each round and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 6},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                 "street": {"type": "string", "maxLength": 40}},
                "required": ["city", "street"], "additionalProperties": False}},
    "required": ["name", "age", "hobbies", "address"], "additionalProperties": False}
TOPICS = ["a chef", "a pilot", "a teacher", "a farmer", "a painter", "a nurse", "a sailor",
          "a judge", "a baker", "a poet", "a miner", "a coach", "a tailor", "a diver",
          "a monk", "a clerk"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from pagedserve import LLM, SamplingParams
    from pagedserve.sampling_params import StructuredOutput

    llm = LLM(device=args.device, progress=False, num_kvcache_blocks=1024)
    chats = [[{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON."}]
             for i in range(args.num_prompts)]
    spec = StructuredOutput(json_schema=json.dumps(SCHEMA))

    def round_(structured: bool) -> tuple[float, int]:
        params = [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens,
                                 structured=spec if structured else None)
                  for i in range(len(chats))]
        started = time.perf_counter()
        outs = llm.chat(chats, params, use_tqdm=False)
        wall = time.perf_counter() - started
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        if structured:
            done = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
            assert all(isinstance(json.loads(c.text), dict) for c in done)
        return tokens / wall, tokens

    for kind in (False, True):
        round_(kind)  # warm-up: kernels, the grammar library, the schema's compile
    rates = {False: [], True: []}
    for i in range(args.rounds):
        for kind in (False, True):
            rate, tokens = round_(kind)
            rates[kind].append(rate)
            print(f"round {i} {'schema' if kind else 'free  '}: {tokens} tokens, {rate:.1f} tok/s",
                  flush=True)
    free, schema = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"median tok/s: unconstrained {free:.1f}, JSON schema {schema:.1f} = "
          f"{100 * schema / free:.1f} % (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
