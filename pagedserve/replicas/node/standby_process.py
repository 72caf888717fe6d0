"""A standby engine process: imports done and weights ready, waiting for a replica to adopt it.

The node's standby pool starts these (plain processes, no Ray worker, no Ray resources). Each
one imports torch and the engine, prepares the model per `mode`, then listens on a Unix socket
of its own. A starting replica connects, sends its engine config, and from then on this process
is that replica's engine process (`engine_core.serve_engine` over the accepted connection).

- `imported`: nothing more; the engine reads its weights when adopted.
- `host`: the checkpoint's tensors in (pinned, when a GPU is present) host memory: adoption
  copies them to the device once.
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

ADOPT_MESSAGE = "adopt"


def run_standby(control, address: str, authkey: bytes, config: dict, mode: str,
                gpu: int | None) -> None:
    """Process entry point (see the module docstring). `gpu`: the device index for `device`
    mode, and the device whose memory host-mode tensors are pinned for."""
    started = time.perf_counter()
    from pagedserve.kernels.triton_cache import use_node_cache

    use_node_cache()  # before triton is imported, as in a spawned engine process
    import torch

    from pagedserve.replicas.engine.engine_core import serve_engine
    from pagedserve.replicas.engine.llm_engine import LLMEngine  # noqa: F401 (the imports)

    phases = {"standby_imports": time.perf_counter() - started}
    try:
        preload_started = time.perf_counter()
        preloaded = _preload(config, mode, gpu, torch)
        phases["standby_preload"] = time.perf_counter() - preload_started
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
    except BaseException as err:
        control.send(("failed", repr(err)))
        return
    adopted = threading.Event()
    threading.Thread(target=_exit_with_pool, args=(control, adopted), daemon=True).start()
    control.send(("ready", os.getpid(), phases))
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
    weights = _usable(preloaded, config, engine_config, gpu_ids, gpu)
    if weights is None and shared_weights is not None:
        weights = {"tensors": shared_weights.named_tensors()}
    serve_engine(conn, engine_config, torch_threads, init_method, phases, **(weights or {}))


def _preload(config: dict, mode: str, gpu: int | None, torch) -> dict | None:
    """What `mode` prepares before adoption: engine keyword arguments (`tensors`/`model`)."""
    if mode == "imported":
        return None
    from pagedserve.config import EngineConfig
    from pagedserve.replicas.engine.llm_engine import resolve_device, resolve_dtype
    from pagedserve.replicas.models.loader import load_model, read_safetensors, safetensors_files
    from pagedserve.replicas.models.registry import resolve_model_dir
    from pagedserve.replicas.models.spec import load_model_spec

    engine_config = EngineConfig(**config)
    model_dir = resolve_model_dir(engine_config.model, progress=False)
    device = resolve_device(engine_config.device)
    if device.type == "cuda" and gpu is not None:
        torch.cuda.set_device(gpu)  # the engine's allocations and graphs go to this GPU
        device = torch.device("cuda", gpu)
    dtype = resolve_dtype(engine_config.dtype, device)
    if mode == "host":
        pin = device.type == "cuda"
        tensors = [(name, t.to(dtype if t.is_floating_point() else t.dtype).pin_memory()
                    if pin else t) for name, t in read_safetensors(safetensors_files(model_dir))]
        return {"tensors": tensors}
    if device.type == "cpu" or engine_config.num_kvcache_blocks is not None:
        return {"engine": _warm_engine(engine_config, device)}
    spec = load_model_spec(model_dir)
    return {"model": load_model(spec, model_dir, dtype, device, progress=False)}


def _warm_engine(config, device):
    """The whole engine, with one short greedy generation run (kernels and caches warm)."""
    from pagedserve.replicas.engine.llm_engine import LLMEngine
    from pagedserve.sampling_params import SamplingParams

    engine = LLMEngine(config, progress=False)
    engine.add_request("standby-warmup", [1, 2, 3, 4],
                       SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step(stream=False)
    return engine


def _usable(preloaded: dict | None, standby_config: dict, engine_config: dict,
            gpu_ids: list[int], gpu: int | None) -> dict | None:
    """The preloaded weights (or engine), if they fit the adopting engine and its device."""
    from pagedserve.config import EngineConfig

    if preloaded is None:
        return None
    ours, theirs = EngineConfig(**standby_config), EngineConfig(**engine_config)
    same_weights = all(getattr(ours, k) == getattr(theirs, k) for k in ("model", "dtype",
                                                                         "device"))
    if not same_weights or theirs.tensor_parallel_size != 1:
        return None
    on_device = "model" in preloaded or "engine" in preloaded
    if on_device and gpu is not None and gpu_ids and gpu_ids[0] != gpu:
        return None  # on another GPU than the replica's
    if "engine" in preloaded and ours != theirs:
        return None  # built for another engine config
    return preloaded


def _select_gpu(gpu_ids: list[int], torch) -> None:
    """Make the replica's GPU the current device (a standby sees all of the node's GPUs)."""
    if gpu_ids and torch.cuda.is_available():
        torch.cuda.set_device(gpu_ids[0])


def _exit_with_pool(control, adopted: threading.Event) -> None:
    """Until adopted, end this process when the pool's end of the pipe closes."""
    try:
        while not adopted.is_set():
            if control.poll(0.5):
                control.recv()  # the pool sends nothing; a message means it is closing
                break
    except (EOFError, OSError):
        pass
    if not adopted.is_set():
        os._exit(0)
