"""A starting replica's side of the weight store: fetch the tensors, or say why not.

The arrays come out of the object store zero-copy (read-only numpy views of shared memory) and
are written once into a shared-memory file for the engine's process (`SharedWeights`). Any
failure (no store, a store that died or refused the model) means loading from disk instead,
with a warning that says why.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from pagedserve.replicas.models.shared_weights import SharedWeights, pack
from pagedserve.replicas.node.services import WEIGHT_STORE, find_or_ask

logger = logging.getLogger(__name__)


async def fetch_shared_weights(app_name: str, router, timeout_s: float) -> SharedWeights | None:
    """The node's weights from its store (found by name), or None (load from disk)."""
    node_id = ray.get_runtime_context().get_node_id()
    try:
        store = await find_or_ask(router, app_name, node_id, WEIGHT_STORE)
        if store is None:
            raise LookupError(f"node {node_id[:16]} has no weight store")
        listing = await asyncio.wait_for(store.tensors.remote(), timeout_s)
        return await asyncio.get_running_loop().run_in_executor(None, _read_and_pack, listing)
    except Exception as err:  # noqa: BLE001 (any failure here has the same remedy: disk)
        logger.warning("weight store unavailable (%s); loading the weights from disk",
                       _short(err))
        if isinstance(err, ray.exceptions.RayActorError | asyncio.TimeoutError):
            await forget_service(router, node_id, WEIGHT_STORE)
        return None


def _read_and_pack(listing: dict) -> SharedWeights:
    names = list(listing)
    arrays = ray.get([listing[n][0] for n in names])  # zero-copy views of the object store
    return pack({n: (a, listing[n][1]) for n, a in zip(names, arrays, strict=True)})


async def forget_service(router, node_id: str, kind: str) -> None:
    """Tell the router a service of this node is dead (best effort)."""
    if router is None:
        return
    try:
        await router.forget_node_service.remote(node_id, kind)
    except Exception as err:  # noqa: BLE001 (best effort: the next replica tries again)
        logger.warning("could not tell the router the %s died: %r", kind, err)


def _short(err: BaseException) -> str:
    """The error's type and its last line: for a store that died, that names the cause."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:400]
