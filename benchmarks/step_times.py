"""Where our engine's time goes on the throughput workload: steps with prefill vs decode-only steps.

    python benchmarks/step_times.py                   # CPU workload of throughput.py
    PAGEDSERVE_ATTENTION=torch python benchmarks/step_times.py   # with the torch references
    python benchmarks/step_times.py --device cuda --model-shape 8b --tensor-parallel-sizes 1,2 --overlap

Runs the same workload as `benchmarks/throughput.py` (same arguments) with our engine only, once
per tensor-parallel size. By default it times every model step (launch to sampled ids on the
host, each step waited for) and prints the split, with the median decode-only step at the
workload's full batch. With `--overlap` the steps stay pipelined as in a real run and it prints
where rank 0's host time went instead: waiting for the device (the device is the bottleneck)
against everything else (the host is), and the part spent publishing steps to the other ranks.
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
    from benchmarks import common, throughput
except ModuleNotFoundError:  # run as `python benchmarks/step_times.py`
    import common
    import throughput

from pagedserve.replicas.engine import step_inputs
from pagedserve.replicas.engine.model_runner import ModelRunner
from pagedserve.replicas.engine.sampler import PendingSample, Sampler
from pagedserve.replicas.parallel.step_channel import StepBroadcaster


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


# With --overlap: where rank 0's host time goes while steps stay pipelined.
HOST_SPLIT = [(PendingSample, "result", "device_wait"),  # waiting for sampled ids
              (ModelRunner, "execute_async", "launch"),  # launching a step; the parts below
              (step_inputs, "prepare", "prepare"),  # flattening the batch (numpy)
              (step_inputs, "upload", "upload"),  # pinning it and queueing the copy
              (StepBroadcaster, "publish", "publish"),  # sending it to the other ranks
              (ModelRunner, "_forward", "forward"),  # queueing the model (graph or eager)
              (Sampler, "sample_async", "sample"),  # queueing logits to ids
              (StepBroadcaster, "share_tokens", "share_ids"),  # sending the ids (NCCL)
              (PendingSample, "__init__", "ids_to_host")]  # queueing their copy to the host
LAUNCH_PARTS = ("prepare", "upload", "publish", "forward", "sample", "share_ids", "ids_to_host")


@contextlib.contextmanager
def launch_of_prefill_steps(totals: dict[str, float], calls: dict[str, int]):
    """While open, also add the launch time of steps that carry prefill tokens under "prefill"."""
    launch = ModelRunner.execute_async
    timed_launch = common.timed_call(launch, "prefill", totals, calls)

    def execute(self, batch):
        with_prefill = any(s.num_tokens > 1 for s in batch.scheduled)
        return (timed_launch if with_prefill else launch)(self, batch)

    ModelRunner.execute_async = execute
    try:
        yield
    finally:
        ModelRunner.execute_async = launch


def main(argv: list[str] | None = None) -> None:
    overlap = "--overlap" in (argv or [])
    args = throughput.parse_args([a for a in (argv or []) if a != "--overlap"])
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as tmp:
        model_dir = throughput.prepare_model_dir(args, Path(tmp))
        for size in args.tensor_parallel_sizes:
            print(f"tensor_parallel_size={size}")
            (report_overlap if overlap else report)(args, model_dir, size)


def timed_run(args, model_dir: Path, tensor_parallel_size: int, instrument):
    """Warm our engine up, then run the workload inside `instrument`: (token counts, wall s)."""
    vocab_size = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
    generate = throughput.ours(args, model_dir, tensor_parallel_size)
    try:
        generate(throughput.device_warmup_workload(args, vocab_size))
        with instrument:
            return generate(throughput.make_workload(args, vocab_size))
    finally:
        generate.close()


@contextlib.contextmanager
def host_split(totals: dict[str, float], calls: dict[str, int]):
    """While open, add up rank 0's host time by `HOST_SPLIT` label, and prefill steps' launch."""
    with launch_of_prefill_steps(totals, calls), common.timed_calls(HOST_SPLIT, totals, calls):
        yield


def report_overlap(args, model_dir: Path, tensor_parallel_size: int) -> None:
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    counts, wall = timed_run(args, model_dir, tensor_parallel_size, host_split(totals, calls))
    steps = max(1, calls.get("launch", 0))
    print(f"{sum(counts)} tokens in {wall:.2f} s = {sum(counts) / wall:.1f} tok/s, {steps} steps, "
          f"{1000 * wall / steps:.2f} ms a step")
    for label in ("device_wait", "launch", *LAUNCH_PARTS):
        seconds = totals.get(label, 0.0)
        indent = "    " if label in LAUNCH_PARTS else "  "
        print(f"{indent}{label}: {seconds:.2f} s ({100 * seconds / wall:.0f}% of wall, "
              f"{1000 * seconds / steps:.3f} ms a step)")
    prefill_steps = calls.get("prefill", 0)
    print(f"  launch of the {prefill_steps} steps with prefill: {totals.get('prefill', 0.0):.2f} s")
    rest = wall - totals.get("device_wait", 0.0) - totals.get("launch", 0.0)
    print(f"  rest of the host (scheduling, outputs): {rest:.2f} s "
          f"({1000 * rest / steps:.3f} ms a step)")


def report(args, model_dir: Path, tensor_parallel_size: int = 1) -> None:
    records: list[tuple[int, int, float]] = []
    counts, wall = timed_run(args, model_dir, tensor_parallel_size, timed_steps(records))
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
