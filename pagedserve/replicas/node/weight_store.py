"""The per-node weight store: the model's tensors in Ray's object store, loaded once per node.

An object lives as long as the process that put it, so a long-lived actor puts the tensors and
keeps the refs; replicas starting on its node read them zero-copy instead of reading disk.
Arrays are numpy (bfloat16 as uint16 bits). The listing is one ref per checkpoint tensor name,
so a tensor-parallel rank can fetch only the tensors it shards (and a sharded store can later
hand out refs per shard under the same names).

The router creates the stores (`services.NodeServices`), so they live exactly as long as the
application; replicas find their node's by name.
"""

from __future__ import annotations

import logging
import time

import ray

logger = logging.getLogger(__name__)

STORE_NAME_PREFIX = "pagedserve-weights"


def store_name(app_name: str, node_id: str) -> str:
    return f"{STORE_NAME_PREFIX}-{app_name}-{node_id[:16]}"


@ray.remote(num_cpus=0)
class WeightStore:
    """One node's copy of the model's tensors in the object store."""

    def __init__(self, model: str | None, max_bytes: int) -> None:
        # Imported here so the actors that only hold handles to stores do not load torch.
        from pagedserve.replicas.models.loader import read_safetensors, safetensors_files
        from pagedserve.replicas.models.registry import resolve_model_dir
        from pagedserve.replicas.models.shared_weights import to_numpy

        started = time.perf_counter()
        files = safetensors_files(resolve_model_dir(model, progress=False))
        on_disk = sum(f.stat().st_size for f in files)
        if on_disk > max_bytes:
            raise ValueError(f"the model's weights ({on_disk / 2**30:.2f} GiB) exceed the weight "
                             f"store's bound ({max_bytes / 2**30:.2f} GiB, weight_store.max_gib)")
        self._tensors: dict[str, tuple[ray.ObjectRef, str]] = {}
        self._nbytes = 0
        for name, tensor in read_safetensors(files):
            array = to_numpy(tensor)
            self._tensors[name] = (ray.put(array), str(tensor.dtype).removeprefix("torch."))
            self._nbytes += array.nbytes
        self._load_s = time.perf_counter() - started
        logger.info("weight store: %d tensors, %.2f GiB in the object store in %.2f s",
                    len(self._tensors), self._nbytes / 2**30, self._load_s)

    def tensors(self, names: list[str] | None = None) -> dict[str, tuple[ray.ObjectRef, str]]:
        """`{checkpoint name: (ref to numpy array, torch dtype name)}`; all, or only `names`."""
        if names is None:
            return dict(self._tensors)
        return {n: self._tensors[n] for n in names if n in self._tensors}

    def stats(self) -> dict:
        """Memory held in the object store, for operators and metrics."""
        return {"num_tensors": len(self._tensors), "bytes": self._nbytes,
                "load_s": self._load_s, "node_id": ray.get_runtime_context().get_node_id()}
