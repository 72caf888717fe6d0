"""Where a decode step's time goes on a GPU, and the memory-bandwidth floor of the workload.

    python benchmarks/profile_decode.py [--model-shape 1b] [--batch 256] [--tensor-parallel-size 2]
        [--kernels 15]

Measures: device copy bandwidth; at a full decode batch, the GPU time of one step (graph replay,
logits, sampling; CUDA events) and of the same step run eagerly, and the host time of each phase
of `LLMEngine.step` (schedule, launch, waiting for tokens, applying them); and the floor of the
standard workload: weights plus KV bytes each decode step must read, over that bandwidth.
With tensor parallelism the other ranks only follow published steps, so the isolated GPU step
times are left out (a lone rank 0 would wait in its first all-reduce); the floor is per rank.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

try:
    from benchmarks import common, random_model, throughput
except ModuleNotFoundError:
    import common
    import random_model
    import throughput

from pagedserve import LLM, SamplingParams


def copy_bandwidth(gib: float = 4.0, reps: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 2 / sorted(times)[len(times) // 2]


@torch.inference_mode()
def gpu_step_seconds(runner, batch, graph: bool, reps: int = 20) -> float:
    """Device time of one decode step's kernels (forward, logits, argmax), inputs prepared once.

    The steps are queued back to back between two events, so host gaps do not count.
    """
    from pagedserve.replicas.engine import step_inputs

    size = runner.graphs.padded_size(len(batch.scheduled)) if graph else None
    host = step_inputs.prepare(batch, runner.block_size, {}, pad_to=size)
    inputs = step_inputs.upload(host, runner.device)

    def one_step():
        if graph:
            hidden = runner.graphs.run(inputs, size)[: host.num_seqs]
        else:
            hidden = runner.model(inputs.ids, inputs.positions, inputs.meta, runner.kv_cache)
        return runner.model.compute_logits(hidden).argmax(dim=-1)

    one_step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        one_step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def phase_targets(engine) -> list[tuple[object, str, str]]:
    """The phases of `LLMEngine.step` whose host time is added up (`common.timed_calls`)."""
    from pagedserve.replicas.engine.sampler import PendingSample

    return [(engine.scheduler, "schedule", "schedule"),
            (engine.runner, "execute_async", "launch (prepare + enqueue)"),
            (engine, "_resolve", "resolve (incl. wait)"),
            (engine, "_outputs", "outputs"),
            (PendingSample, "result", "wait for sampled ids")]


def decode_batch_of(engine, allocate: bool = False):
    """The running sequences that next compute one token (given a block for it if `allocate`)."""
    from pagedserve.replicas.engine.scheduler import ScheduledSeq, SchedulerOutput

    seqs = [s for s in engine.scheduler.running if s.num_uncomputed_tokens == 1]
    if allocate:
        seqs = [s for s in seqs if engine.block_manager.allocate(s, s.num_computed_tokens + 1)]
    return SchedulerOutput([ScheduledSeq(s, 1) for s in seqs])


def print_top_kernels(engine, top: int, steps: int = 10) -> None:
    """Device time a step of this process's costliest kernels (graph replays included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step(stream=False)
        torch.cuda.synchronize()
    rows = [(_device_us(e), e.count, e.key) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[0] > 0), reverse=True)
    total = sum(r[0] for r in rows)
    print(f"device time of rank 0's kernels: {total / steps / 1e3:.2f} ms a step")
    for us, count, name in rows[:top]:
        print(f"  {us / steps:9.1f} us {count / steps:6.1f}x  {name[:90]}")


def _device_us(event) -> float:
    """An event's own device microseconds (the attribute's name differs across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def workload_floor(wl, weight_bytes: int, kv_bytes_per_token: int, bw: float) -> dict:
    """Decode time if every step read only the weights and the live KV once, at `bw`."""
    total_s, steps = 0.0, max(wl.output_lens)
    for t in range(steps):
        live = [len(p) + t for p, n in zip(wl.prompts, wl.output_lens, strict=True) if n > t]
        total_s += (weight_bytes + sum(live) * kv_bytes_per_token) / bw
    tokens = sum(wl.output_lens)
    return {"decode_steps": steps, "floor_s": total_s, "floor_tokens_per_s": tokens / total_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-shape", default="1b", choices=tuple(random_model.SHAPES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="also print rank 0's N costliest kernels a step (torch profiler)")
    args = p.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    targs = throughput.parse_args(["--device", "cuda", "--num-prompts", str(args.batch)])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model.write_random_llama(Path(tmp) / "m", args.model_shape,
                                                    device="cuda")
        llm = LLM(str(model_dir), device="cuda", progress=False, max_model_len=2048,
                  max_num_seqs=args.batch, tensor_parallel_size=args.tensor_parallel_size)
    engine = llm.engine
    wl = throughput.make_workload(targs, random_model.VOCAB)
    for i, (prompt, n) in enumerate(zip(wl.prompts, wl.output_lens, strict=True)):
        engine.add_request(f"p{i}", prompt, SamplingParams(temperature=0, max_tokens=n,
                                                           ignore_eos=True))
    while len(decode_batch_of(engine).scheduled) < args.batch:  # prefill everything
        engine.step(stream=False)
    for _ in range(5):
        engine.step(stream=False)
    totals: dict[str, float] = {}
    steps = 50
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with common.timed_calls(phase_targets(engine), totals):
        for _ in range(steps):
            engine.step(stream=False)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    phases = {k: v / steps for k, v in totals.items()}
    print(f"wall/step {wall * 1e3:.2f} ms; host phases (ms/step): "
          + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in phases.items()), flush=True)
    if args.kernels:
        print_top_kernels(engine, args.kernels)
    engine.step(stream=False)
    engine.overlap_steps = False  # the same steps without pipelining, for comparison
    engine.step(stream=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        engine.step(stream=False)
    wall_sequential = (time.perf_counter() - t0) / 20
    print(f"wall/step without pipelining {wall_sequential * 1e3:.2f} ms", flush=True)
    batch = decode_batch_of(engine, allocate=True)
    runner = engine.runner
    gpu_graph = gpu_eager = float("nan")
    if args.tensor_parallel_size == 1:
        gpu_graph = gpu_step_seconds(runner, batch, graph=True)
        gpu_eager = gpu_step_seconds(runner, batch, graph=False, reps=5)
    spec = engine.spec
    weight_bytes = sum(t.numel() * t.element_size() for t in runner.model.parameters())
    kv_token = runner.kv_cache_bytes_per_block() // runner.block_size
    live = sum(item.seq.num_computed_tokens + 1 for item in batch.scheduled)
    step_floor = (weight_bytes + live * kv_token) / bw
    full = throughput.make_workload(throughput.parse_args(["--device", "cuda"]), random_model.VOCAB)
    result = {
        "device_name": torch.cuda.get_device_name(), "model_shape": args.model_shape,
        "tensor_parallel_size": args.tensor_parallel_size,
        "copy_bandwidth_Bps": bw, "batch": len(batch.scheduled), "live_kv_tokens": live,
        "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_token,
        "wall_per_step_s": wall, "wall_per_step_sequential_s": wall_sequential,
        "host_phases_per_step_s": phases,
        "gpu_step_graph_s": gpu_graph, "gpu_step_eager_s": gpu_eager,
        "step_bandwidth_floor_s": step_floor, "layers": spec.num_layers,
        "workload_floor": workload_floor(full, weight_bytes, kv_token, bw),
    }
    llm.shutdown()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"batch {result['batch']}: wall/step {wall * 1e3:.2f} ms, GPU/step graph "
          f"{gpu_graph * 1e3:.2f} ms, eager {gpu_eager * 1e3:.2f} ms, floor {step_floor * 1e3:.2f} ms")
    for k, v in phases.items():
        print(f"  host {k}: {v * 1e3:.2f} ms/step")
    wf = result["workload_floor"]
    print(f"workload decode floor: {wf['floor_s']:.2f} s = {wf['floor_tokens_per_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
