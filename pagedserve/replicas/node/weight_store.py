"""The per-node weight store: the model's tensors in one shared-memory file, loaded once per node.

The store reads the checkpoint once and writes every tensor, in its own dtype, into an
anonymous shared-memory file (a memfd) that it owns and keeps open for its whole life. The
processes that need the weights are not Ray workers (a replica's engine process, a standby
engine), so they cannot read Ray's object store; any process of the same user can map a memfd
through `/proc/<store pid>/fd/<fd>` (`handle`). Each reader copies the tensors (a
tensor-parallel rank only its shard) straight from that mapping to its device: one copy of the
weights per node, and nothing written under `/dev/shm` that a killed process could leak. The
memory is freed once the store and every mapping are gone.

The router creates the stores (`services.NodeServices`), so they live exactly as long as the
application; replicas and standby pools find their node's by name.
"""

from __future__ import annotations

import logging
import os
import time

import ray

logger = logging.getLogger(__name__)

STORE_NAME_PREFIX = "pagedserve-weights"


def store_name(app_name: str, node_id: str) -> str:
    return f"{STORE_NAME_PREFIX}-{app_name}-{node_id[:16]}"


@ray.remote(num_cpus=0)
class WeightStore:
    """One node's copy of the model's tensors, in a shared-memory file it owns."""

    def __init__(self, model: str | None, max_bytes: int) -> None:
        # Imported here so the actors that only hold handles to stores do not load torch.
        from pagedserve.replicas.models.loader import read_safetensors, safetensors_files
        from pagedserve.replicas.models.registry import resolve_model_dir
        from pagedserve.replicas.models.shared_weights import create_memfd, write_tensors

        started = time.perf_counter()
        files = safetensors_files(resolve_model_dir(model, progress=False))
        on_disk = sum(f.stat().st_size for f in files)
        if on_disk > max_bytes:
            raise ValueError(f"the model's weights ({on_disk / 2**30:.2f} GiB) exceed the weight "
                             f"store's bound ({max_bytes / 2**30:.2f} GiB, weight_store.max_gib)")
        self._fd = create_memfd()  # closed only when this process ends
        self._entries = write_tensors(self._fd, read_safetensors(files))
        self._nbytes = sum(e.nbytes for e in self._entries)
        self._load_s = time.perf_counter() - started
        logger.info("weight store: %d tensors, %.2f GiB in shared memory in %.2f s",
                    len(self._entries), self._nbytes / 2**30, self._load_s)

    def handle(self):
        """What a reader needs to map the tensors (a `SharedWeights`): no copy is made."""
        from pagedserve.replicas.models.shared_weights import SharedWeights

        return SharedWeights(f"/proc/{os.getpid()}/fd/{self._fd}", self._entries)

    def stats(self) -> dict:
        """Shared memory held, for operators and metrics."""
        return {"num_tensors": len(self._entries), "bytes": self._nbytes,
                "load_s": self._load_s, "node_id": ray.get_runtime_context().get_node_id()}
