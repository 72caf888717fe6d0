"""Per-step control overhead of tensor parallelism: rank 0 broadcasting a step to the others.

    python benchmarks/tp_step_overhead.py                  # CPU, gloo, 2 ranks
    python benchmarks/tp_step_overhead.py --device cuda    # NCCL, one GPU per rank

Each iteration is what a decode step of `--batch` sequences costs beyond the model: rank 0
publishes the step's header and flat inputs (`StepBroadcaster.publish`, one write into each
other rank's step pipe) and, on GPUs, later its sampled ids (`share_tokens`, NCCL); the other
ranks receive them. A one-element all-reduce per iteration stands for the model's first
collective, which keeps the ranks in lockstep as a real step does; the same loop with only that
all-reduce is timed too, and the difference is the overhead of the step control. For comparison, a Ray actor call round trip (what a
per-rank Ray task per step would cost at least) is timed when Ray is installed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np
import torch
import torch.distributed as dist

from pagedserve.replicas.engine.step_inputs import HostInputs, upload
from pagedserve.replicas.parallel.group import join_group, leave_group
from pagedserve.replicas.parallel.rendezvous import rendezvous_address
from pagedserve.replicas.parallel.step_channel import StepBroadcaster, StepReceiver


def decode_step(batch: int, blocks_per_seq: int) -> HostInputs:
    rows = np.arange(batch, dtype=np.int64)
    return HostInputs(
        ids=rows, positions=rows + 100, slots=rows * 16, context_lens=rows + 101,
        query_start_loc=np.arange(batch + 1, dtype=np.int64),
        block_tables=np.arange(batch * blocks_per_seq, dtype=np.int64).reshape(batch, -1),
        sample_rows=rows, fill_rows=rows, fill_from=rows, num_seqs=batch, num_decodes=batch,
        max_query_len=1,
    )


def _loop(rank: int, size: int, init_method: str, device: str, args, with_channel: bool,
          result=None) -> None:
    tp = join_group(init_method, rank, size, torch.device(device))
    tick = torch.zeros(1, device=tp.device)
    host = decode_step(args.batch, args.blocks_per_seq)
    sender = StepBroadcaster(tp) if rank == 0 else None
    receiver = StepReceiver(tp) if rank else None
    for phase in ("warmup", "timed"):
        iters = args.iters if phase == "timed" else 20
        if tp.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            if with_channel and sender is not None:
                inputs = upload(host, tp.device)
                sender.publish(host, inputs, None)
                dist.all_reduce(tick)
                sender.share_tokens(inputs.ids)
            elif with_channel:
                step = receiver.receive()
                dist.all_reduce(tick)
                if step.ids_follow:
                    receiver.receive_tokens(len(step.inputs.sample_rows))
            else:
                dist.all_reduce(tick)
        if tp.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    if rank == 0 and result is not None:
        result.put(elapsed / args.iters)
    leave_group()


def time_loop(args, with_channel: bool) -> float:
    ctx = multiprocessing.get_context("spawn")
    init_method = rendezvous_address()
    result = ctx.Queue()
    dev = lambda r: f"cuda:{r}" if args.device == "cuda" else "cpu"  # noqa: E731
    others = [ctx.Process(target=_loop, args=(r, args.ranks, init_method, dev(r), args,
                                               with_channel)) for r in range(1, args.ranks)]
    for p in others:
        p.start()
    _loop(0, args.ranks, init_method, dev(0), args, with_channel, result)
    for p in others:
        p.join()
    return result.get()


def ray_round_trip_s(iters: int) -> float | None:
    try:
        import ray
    except ImportError:
        return None

    @ray.remote(num_cpus=0)
    class Echo:
        def ping(self, x):
            return x

    ray.init(num_cpus=1, include_dashboard=False, logging_level="error")
    try:
        echo = Echo.remote()
        ray.get(echo.ping.remote(0))
        start = time.perf_counter()
        for i in range(iters):
            ray.get(echo.ping.remote(i))
        return (time.perf_counter() - start) / iters
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="decode sequences per step")
    p.add_argument("--blocks-per-seq", type=int, default=64, help="block table width")
    p.add_argument("--iters", type=int, default=500)
    args = p.parse_args()
    base = time_loop(args, with_channel=False)
    full = time_loop(args, with_channel=True)
    print(f"device {args.device}, {args.ranks} ranks, decode batch {args.batch}, "
          f"block table width {args.blocks_per_seq}, {args.iters} steps")
    print(f"  one all-reduce per step (lockstep only): {base * 1e6:8.1f} us/step")
    print(f"  + step broadcast (header, inputs, ids):  {full * 1e6:8.1f} us/step")
    print(f"  control overhead:                        {(full - base) * 1e6:8.1f} us/step")
    ray_s = ray_round_trip_s(min(args.iters, 200))
    if ray_s is not None:
        print(f"  for comparison, one Ray actor call round trip: {ray_s * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
