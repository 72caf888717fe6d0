"""A standby engine process: imports done and weights ready, waiting for a replica to adopt it.

The node's standby pool starts these (plain processes, no Ray worker, no Ray resources). Each
one imports torch and the engine, prepares the model per `mode`, then listens on a Unix socket
of its own. A starting replica connects, sends its engine config, and from then on this process
is that replica's engine process (`engine_core.serve_engine` over the accepted connection).

In every mode the model's config and tokenizer are read ahead (the adopting engine skips its
`model_files` phase).
- `imported`: nothing more; the engine reads its weights when adopted.
- `host`: the checkpoint's tensors in (pinned, when a GPU is present) host memory: adoption
  copies them to the device once. With a weight store on the node that memory is the store's,
  mapped and registered in place (`standby_weights`), so the node holds the model once.
- `device`: the model built and loaded on its device. Where the KV cache's size is known
  before adoption (a CPU engine, or a fixed `num_kvcache_blocks`) the whole engine is built,
  KV cache, graphs and one warm-up step included, and adoption only connects; otherwise the KV
  cache is sized from free memory and graphs are captured at adoption.

An unadopted standby exits when its pool's pipe closes (the pool is gone); an adopted one when
its replica's connection closes (the replica is gone), so neither outlives its owner.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from multiprocessing.connection import Listener

from pagedserve.replicas.node.standby_weights import WEIGHTS_MESSAGE

ADOPT_MESSAGE = "adopt"


def run_standby(control, address: str, authkey: bytes, config: dict, mode: str,
                gpu: int | None, store_wait_s: float | None = None) -> None:
    """Process entry point (see the module docstring). `gpu`: the device index for `device`
    mode, and the device whose memory host-mode tensors are pinned for. `store_wait_s`: how
    long a host-mode standby waits for the pool to send the node's weight store (None: the node
    has none)."""
    started = time.perf_counter()
    from pagedserve.kernels.triton_cache import use_node_cache

    use_node_cache()  # before triton is imported, as in a spawned engine process
    import torch

    from pagedserve.replicas.engine.engine_core import serve_engine
    from pagedserve.replicas.engine.llm_engine import LLMEngine  # noqa: F401 (the imports)

    phases = {"standby_imports": time.perf_counter() - started}
    try:
        preload_started = time.perf_counter()
        preloaded, weights = _preload(config, mode, gpu, torch, control, store_wait_s)
        phases["standby_preload"] = time.perf_counter() - preload_started
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
    except BaseException as err:
        control.send(("failed", repr(err)))
        return
    adopted = threading.Event()
    threading.Thread(target=_exit_with_pool, args=(control, adopted), daemon=True).start()
    control.send(("ready", os.getpid(), phases, weights))
    conn = listener.accept()
    adopted.set()
    listener.close()
    with contextlib.suppress(OSError):  # a pool that is gone does not end an adopted engine
        control.send(("adopted",))
    try:
        kind, engine_config, torch_threads, init_method, gpu_ids, shared_weights = conn.recv()
    except (EOFError, OSError):
        return  # the replica left before it sent its config
    if kind != ADOPT_MESSAGE:
        conn.send(("dead", f"a standby engine expects {ADOPT_MESSAGE!r} first, got {kind!r}"))
        return
    _select_gpu(gpu_ids, torch)
    ready = _usable(preloaded, config, engine_config, gpu_ids, gpu)
    if not ready.keys() & {"tensors", "model", "engine"} and shared_weights is not None:
        ready["tensors"] = shared_weights.named_tensors()
    serve_engine(conn, engine_config, torch_threads, init_method, phases, **ready)


def _preload(config: dict, mode: str, gpu: int | None, torch, control,
             store_wait_s: float | None) -> tuple[dict, dict]:
    """What `mode` prepares before adoption, as engine keyword arguments: the model's files
    (config, tokenizer) in every mode, plus `tensors`, `model` or a whole `engine`; and where
    the weights came from (`{"from": ...}`; see `standby_weights.host_tensors` for host mode)."""
    from pagedserve.config import EngineConfig, resolve_device, resolve_dtype
    from pagedserve.replicas.models.loader import load_model
    from pagedserve.replicas.models.model_files import load_model_files
    from pagedserve.replicas.node.standby_weights import host_tensors

    engine_config = EngineConfig(**config)
    device = resolve_device(engine_config.device)
    if device.type == "cuda" and gpu is not None:
        torch.cuda.set_device(gpu)  # the engine's allocations and graphs go to this GPU
        device = torch.device("cuda", gpu)
    if mode == "device" and (device.type == "cpu" or engine_config.num_kvcache_blocks is not None):
        return {"engine": _warm_engine(engine_config)}, {"from": "files"}
    files = load_model_files(engine_config.model, progress=False)
    if mode == "imported":
        return {"files": files}, {"from": "adoption"}  # the adopting replica's store or disk
    dtype = resolve_dtype(engine_config.dtype, device)
    if mode == "host":
        tensors, weights = host_tensors(files, dtype, device, control, store_wait_s)
        return {"files": files, "tensors": tensors}, weights
    return {"files": files, "model": load_model(files.spec, files.model_dir, dtype, device,
                                                progress=False)}, {"from": "files"}


def _warm_engine(config):
    """The whole engine, with one short greedy generation run (kernels and caches warm)."""
    from pagedserve.replicas.engine.llm_engine import LLMEngine
    from pagedserve.sampling_params import SamplingParams

    engine = LLMEngine(config, progress=False)
    engine.add_request("standby-warmup", [1, 2, 3, 4],
                       SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step(stream=False)
    return engine


def _usable(preloaded: dict, standby_config: dict, engine_config: dict,
            gpu_ids: list[int], gpu: int | None) -> dict:
    """What of the preload fits the adopting engine and its device (as engine keyword
    arguments): nothing for another model; the files alone for other weights or another GPU."""
    from pagedserve.config import EngineConfig

    ours, theirs = EngineConfig(**standby_config), EngineConfig(**engine_config)
    if ours.model != theirs.model:
        return {}
    files = {"files": preloaded["files"]} if "files" in preloaded else {}
    same_weights = ours.dtype == theirs.dtype and ours.device == theirs.device
    if not same_weights or theirs.tensor_parallel_size != 1:
        return files
    on_device = "model" in preloaded or "engine" in preloaded
    if on_device and gpu is not None and gpu_ids and gpu_ids[0] != gpu:
        return files  # on another GPU than the replica's
    if "engine" in preloaded and ours != theirs:
        return files  # built for another engine config
    return dict(preloaded)


def _select_gpu(gpu_ids: list[int], torch) -> None:
    """Make the replica's GPU the current device (a standby sees all of the node's GPUs)."""
    if gpu_ids and torch.cuda.is_available():
        torch.cuda.set_device(gpu_ids[0])


def _exit_with_pool(control, adopted: threading.Event) -> None:
    """Until adopted, end this process when the pool's end of the pipe closes."""
    try:
        while not adopted.is_set():
            # The pool sends nothing now but a late weight store (this standby did without).
            if control.poll(0.5) and control.recv()[0] != WEIGHTS_MESSAGE:
                break
    except (EOFError, OSError):
        pass
    if not adopted.is_set():
        os._exit(0)
