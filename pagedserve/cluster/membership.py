"""Which replicas Serve is stopping, so the router stops admitting to them at once.

Serve picks the replica to remove on a scale-down itself and does not tell the replica; it
only waits for the replica's ongoing calls before stopping it. The router reads the replica
deployment's details from the Serve controller every `poll_s` and retires every replica in the
STOPPING state. That is the drain: no new admissions; running streams finish within the
deployment's `graceful_shutdown_timeout_s` (Serve waits for them before it stops the replica).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import ray
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

logger = logging.getLogger(__name__)

STOPPING_STATES = {"STOPPING"}


async def replica_states(app_name: str, deployment_name: str) -> tuple[dict[str, str], int]:
    """`{replica unique id: state}` of one deployment, as the Serve controller sees it, and
    the deployment's target replica count."""
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = await controller.get_deployment_details.remote(app_name, deployment_name)
    states = {r.replica_id: str(getattr(r.state, "value", r.state)) for r in details.replicas}
    return states, int(details.target_num_replicas)


async def watch_membership(app_name: str, deployment_name: str, poll_s: float,
                           on_states: Callable[[dict[str, str], int], None]) -> None:
    """Call `on_states(states, target)` for the deployment every `poll_s`, forever."""
    warned = False
    while True:
        try:
            on_states(*await replica_states(app_name, deployment_name))
            warned = False
        except Exception as err:  # the controller restarts, or the app is being deleted
            if not warned:
                logger.warning("cannot read the replica states of %s/%s: %r",
                               app_name, deployment_name, err)
                warned = True
        await asyncio.sleep(poll_s)
