"""Starting the ranks of a tensor-parallel engine (no Ray here).

Rank 0 is the engine itself: it runs the scheduler and drives every step. Ranks 1..N-1 run
`run_rank`, which loads their shard of the model and follows rank 0's steps. In a Serve replica
they are Ray actors in the replica's placement group (`workers.py`); offline, `LocalRanks`
starts them as child processes of the engine's process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os

import torch
import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.replicas.engine.spawn_main import without_parent_main
from pagedserve.replicas.parallel.group import join_group, leave_group
from pagedserve.replicas.parallel.layers import TensorParallel, check_tensor_parallel
from pagedserve.replicas.parallel.rendezvous import rendezvous_address


def run_rank(config: dict, rank: int, init_method: str, device: str | None = None,
             torch_threads: int | None = None) -> None:
    """Entry point of rank `rank` > 0: join the group, load this rank's shard, follow rank 0.

    Returns when rank 0 stops the group; raises if rank 0 (or any rank) goes away mid-step.
    """
    _injected_start_fault(rank)
    from pagedserve.config import resolve_device, resolve_dtype
    from pagedserve.replicas.engine.model_runner import ModelRunner
    from pagedserve.replicas.models.registry import resolve_model_dir
    from pagedserve.replicas.models.spec import load_model_spec

    engine_config = EngineConfig(**config)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    model_dir = resolve_model_dir(engine_config.model, progress=False)
    spec = load_model_spec(model_dir)
    size = engine_config.tensor_parallel_size
    check_tensor_parallel(spec.num_heads, spec.num_kv_heads, spec.intermediate_size, size)
    target = torch.device(device) if device else resolve_device(engine_config.device)
    dtype = resolve_dtype(engine_config.dtype, target)
    torch.manual_seed(engine_config.seed)
    tp = join_group(init_method, rank, size, target)
    runner = None
    try:
        runner = ModelRunner(engine_config, spec, model_dir, tp.device, dtype, [], False, tp)
        runner.follow()
    finally:
        if runner is not None:
            runner.release_graphs()
        leave_group(tp)


def join_as_rank0(config: EngineConfig, device: torch.device,
                  init_method: str | None) -> tuple[TensorParallel, LocalRanks | None]:
    """Join the engine's group as rank 0.

    With no `init_method` (offline use) the other ranks are started here as local processes;
    otherwise they were started elsewhere (Ray actors) and wait at that address.
    """
    if dist.is_initialized():
        raise ValueError("this process already belongs to a tensor-parallel group; shut the "
                         "other tensor-parallel engine down first (one per process)")
    local = None
    if init_method is None:
        local = LocalRanks(config, device)
        init_method = local.init_method
        if device.type == "cuda":
            device = torch.device("cuda", 0)
    try:
        rank_failure = local.failure if local is not None else None
        return join_group(init_method, 0, config.tensor_parallel_size, device,
                          rank_failure), local
    except BaseException:
        if local is not None:
            local.stop()
        raise


class LocalRanks:
    """Ranks 1..N-1 of an offline engine as child processes (rank r on cuda:r on a GPU)."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        size = config.tensor_parallel_size
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs; "
                             f"{torch.cuda.device_count()} are visible")
        self.init_method = rendezvous_address()
        threads = max(1, torch.get_num_threads() // size) if device.type == "cpu" else None
        ctx = multiprocessing.get_context("spawn")
        self.processes, self.errors = [], []
        for rank in range(1, size):
            rank_device = f"cuda:{rank}" if device.type == "cuda" else "cpu"
            errors, child_errors = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_run_local_rank, name=f"pagedserve-tp-rank{rank}", daemon=True,
                args=(child_errors, config.model_dump(), rank, self.init_method, rank_device,
                      threads))
            with without_parent_main():  # a script piped to `python -` cannot be re-run
                process.start()
            child_errors.close()
            self.processes.append(process)
            self.errors.append(errors)

    def failure(self) -> str | None:
        """A description of the first rank that exited (its exit code and error), else None."""
        for rank, (process, errors) in enumerate(zip(self.processes, self.errors, strict=True), start=1):
            if process.is_alive():
                continue
            error = "it sent no error (see its output above)"
            try:
                if errors.poll():
                    error = errors.recv()
            except (EOFError, OSError):
                pass
            return f"tensor-parallel rank {rank} exited with code {process.exitcode}: {error}"
        return None

    def stop(self, timeout_s: float = 10.0) -> None:
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()


def _run_local_rank(errors, *args) -> None:
    """A local rank's process: `run_rank`, sending its error (if any) to the parent first."""
    try:
        run_rank(*args)
    except BaseException as err:
        with contextlib.suppress(OSError):  # the parent may be gone already
            errors.send(f"{type(err).__name__}: {err}")
        raise


def _injected_start_fault(rank: int) -> None:
    """Tests make one rank fail at start: PAGEDSERVE_TP_START_FAULT=<rank>."""
    if os.environ.get("PAGEDSERVE_TP_START_FAULT") == str(rank):
        raise RuntimeError(f"start-up fault injected into tensor-parallel rank {rank} "
                           f"(PAGEDSERVE_TP_START_FAULT={rank})")
