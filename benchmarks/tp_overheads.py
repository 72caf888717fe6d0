"""What tensor parallelism adds to a step on two GPUs: the all-reduces and the step control.

    python benchmarks/tp_overheads.py [--hidden 4096] [--layers 32]

Per decode batch size: the time of one all-reduce of [batch, hidden] bfloat16 replayed in a CUDA
graph (as a decode step runs them; a step has 2 per layer), with NCCL and, where this torch has
it, with our symmetric-memory one-shot all-reduce (`SymmetricAllReduce`: alone, followed by the
residual add + RMSNorm, and fused with them); and the host time of rank 0's step control (one
write of the header and the step's flat inputs, their size at that batch, into rank 1's step
pipe, which rank 1 reads meanwhile).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedserve.kernels.fused_ops import add_rms_norm
from pagedserve.replicas.parallel import step_pipes, symmetric_all_reduce
from pagedserve.replicas.parallel.step_channel import HEADER_LEN

BATCHES = (1, 8, 32, 128, 256)
REPLAYS = 20


def graph_time_us(op, x: torch.Tensor, reps: int) -> float:
    """Microseconds per `op(x)` with `reps` of them captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            op(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            op(x)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(REPLAYS):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / REPLAYS / reps * 1e6


def norm_times_us(ours, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Our all-reduce (`SymmetricAllReduce`), then with the residual add + RMSNorm after it as
    two kernels, and as the one fused kernel (`add_norm`)."""
    residual = torch.randn_like(x)
    weight = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    return {
        "ours_us": graph_time_us(ours, x, reps),
        "ours_then_norm_us": graph_time_us(
            lambda t: add_rms_norm(ours(t), residual, weight, 1e-5), x, reps),
        "fused_us": graph_time_us(lambda t: ours.add_norm(t, residual, weight, 1e-5), x, reps),
    }


def control_time_us(rank: int, batch: int, table_width: int, reps: int = 200) -> float:
    """Rank 0's host microseconds per step to send a header and a step's flat inputs."""
    message = np.zeros(HEADER_LEN + batch * (6 + table_width) + 1, dtype=np.int64)
    if rank == 0:
        pipes = step_pipes.open_writers(2)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(reps):
            pipes.send(message)
        elapsed = time.perf_counter() - start
        pipes.close()
    else:
        pipe = step_pipes.open_reader(1)
        dist.barrier()
        for _ in range(reps):
            pipe.receive(len(message))
        pipe.close()
        elapsed = 0.0
    dist.barrier()
    return elapsed / reps * 1e6


def worker(rank: int, args, init: str, out: dict) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=2)
    ours = None
    if symmetric_all_reduce.available():
        ours = symmetric_all_reduce.SymmetricAllReduce(torch.device("cuda", rank), torch.bfloat16)
    reps = 2 * args.layers
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, args.hidden, device="cuda").to(torch.bfloat16)
        row = {"batch": batch, "bytes": x.numel() * 2,
               "nccl_us": graph_time_us(dist.all_reduce, x, reps)}
        if ours is not None:
            row.update(norm_times_us(ours, x, reps))
        row["control_us"] = control_time_us(rank, batch, args.table_width)
        rows.append(row)
    if rank == 0:
        out["rows"] = rows
        out["device"] = torch.cuda.get_device_name()
        out["torch"] = torch.__version__
    if ours is not None:
        ours.release()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--table-width", type=int, default=128, help="KV blocks per sequence")
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    from pagedserve.replicas.parallel.rendezvous import rendezvous_address

    init = rendezvous_address()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args, init, out), nprocs=2)
        result = dict(out)
    print(json.dumps(result, indent=2))
    cols = ["nccl_us", "ours_us", "ours_then_norm_us", "fused_us", "control_us"]
    print(f"{'batch':>6} {'bytes':>9} " + " ".join(f"{c[:-3]:>15}" for c in cols) + "  (us)")
    for r in result["rows"]:
        print(f"{r['batch']:>6} {r['bytes']:>9} "
              + " ".join(f"{r.get(c, float('nan')):>15.1f}" for c in cols))


if __name__ == "__main__":
    main()
