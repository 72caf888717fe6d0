"""Where our engine's time goes on the throughput workload: steps with prefill vs decode-only steps.

    python benchmarks/step_times.py                   # CPU workload of throughput.py
    PAGEDSERVE_ATTENTION=torch python benchmarks/step_times.py   # with the torch references

Runs the same workload as `benchmarks/throughput.py` (same arguments) with our engine only, times
every model step (launch to sampled ids on the host) and prints the split, with the median
decode-only step at the workload's full batch.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import transformers

try:
    from benchmarks import throughput
except ModuleNotFoundError:  # run as `python benchmarks/step_times.py`
    import throughput

from pagedserve.replicas.engine.model_runner import ModelRunner


@contextlib.contextmanager
def timed_steps(records: list[tuple[int, int, float]]):
    """While open, each model step appends (prefill tokens, decodes, seconds) to `records`.

    Each step is waited for, which on a GPU removes the engine's overlap of scheduling with the
    device; on a CPU a step is computed before `execute_async` returns, so nothing changes.
    """
    launch = ModelRunner.execute_async

    def execute_and_wait(self, batch):
        start = time.perf_counter()
        pending = launch(self, batch)
        if pending is not None:
            pending.result()
        prefill = sum(s.num_tokens for s in batch.scheduled if s.num_tokens > 1)
        records.append((prefill, batch.num_decodes, time.perf_counter() - start))
        return pending

    ModelRunner.execute_async = execute_and_wait
    try:
        yield
    finally:
        ModelRunner.execute_async = launch


def main(argv: list[str] | None = None) -> None:
    args = throughput.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as tmp:
        report(args, throughput.prepare_model_dir(args, Path(tmp)))


def report(args, model_dir: Path) -> None:
    vocab_size = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
    records: list[tuple[int, int, float]] = []
    generate = throughput.ours(args, model_dir)
    try:
        generate(throughput.device_warmup_workload(args, vocab_size))
        with timed_steps(records):
            counts, wall = generate(throughput.make_workload(args, vocab_size))
    finally:
        generate.close()
    with_prefill = [r for r in records if r[0]]
    decode_only = [r for r in records if not r[0]]
    full = [r[2] for r in decode_only if r[1] == args.num_prompts]
    print(f"{sum(counts)} tokens in {wall:.2f} s = {sum(counts) / wall:.1f} tok/s, "
          f"{len(records)} steps")
    print(f"steps with prefill: {len(with_prefill)}, {sum(r[2] for r in with_prefill):.2f} s "
          f"({sum(r[0] for r in with_prefill)} prefill tokens)")
    print(f"decode-only steps: {len(decode_only)}, {sum(r[2] for r in decode_only):.2f} s"
          + (f"; median at batch {args.num_prompts}: {1000 * statistics.median(full):.0f} ms"
             if full else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
