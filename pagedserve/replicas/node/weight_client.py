"""A starting replica's side of the weight store: get the store's handle, or say why not.

The handle names the store's shared-memory file (`SharedWeights`); the engine's process maps
it and copies the tensors to its device, so nothing is copied here. The replica checks that it
can open the file first: a store of another user, a `/proc` that hides other processes' files,
or a store that just died would otherwise fail the engine's start. Any failure (no store, a
store that died or refused the model, a file that cannot be opened) means loading from disk
instead, with a warning that says why.
"""

from __future__ import annotations

import asyncio
import logging
import os

import ray

from pagedserve.replicas.models.shared_weights import SharedWeights
from pagedserve.replicas.node.failures import short_error
from pagedserve.replicas.node.services import WEIGHT_STORE, find_or_ask

logger = logging.getLogger(__name__)


async def fetch_shared_weights(app_name: str, router, timeout_s: float) -> SharedWeights | None:
    """The node's weights from its store (found by name), or None (load from disk)."""
    node_id = ray.get_runtime_context().get_node_id()
    try:
        store = await find_or_ask(router, app_name, node_id, WEIGHT_STORE)
        if store is None:
            raise LookupError(f"node {node_id[:16]} has no weight store")
        shared = await asyncio.wait_for(store.handle.remote(), timeout_s)
        check_readable(shared)
        return shared
    except Exception as err:  # noqa: BLE001 (any failure here has the same remedy: disk)
        logger.warning("weight store unavailable (%s); loading the weights from disk",
                       short_error(err))
        if isinstance(err, ray.exceptions.RayActorError | asyncio.TimeoutError):
            await forget_service(router, node_id, WEIGHT_STORE)
        return None


def check_readable(shared: SharedWeights) -> None:
    """Raise OSError, saying so, unless this process can open the store's file."""
    try:
        os.close(os.open(shared.path, os.O_RDONLY))
    except OSError as err:
        raise OSError(err.errno, f"cannot open the store's shared memory ({err.strerror})",
                      shared.path) from err


async def forget_service(router, node_id: str, kind: str) -> None:
    """Tell the router a service of this node is dead (best effort)."""
    if router is None:
        return
    try:
        await router.forget_node_service.remote(node_id, kind)
    except Exception as err:  # noqa: BLE001 (best effort: the next replica tries again)
        logger.warning("could not tell the router the %s died: %r", kind, err)
