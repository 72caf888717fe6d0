"""A host-mode standby's weights: the node's weight store mapped in place, else its own copy.

With a weight store on the node the standby keeps no copy of its own: it maps the store's
shared memory (read-only) and, on a GPU, registers that mapping as pinned, so adoption copies
each tensor straight to the device. The node then holds the model once, however many standbys
it keeps. The pool (a Ray worker, which can reach the store) sends the store's handle over the
standby's control pipe once the store has loaded; without one in time, or when the memory
cannot be mapped, the standby reads the files into pinned memory of its own, and says why.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

WEIGHTS_MESSAGE = "weights"  # ("weights", SharedWeights | None, why it is None)


def host_tensors(files, dtype, device, control, store_wait_s: float | None
                 ) -> tuple[list, dict]:
    """`(tensors, weights)`: the checkpoint's `(name, host tensor)` pairs and where they came
    from (`{"from": "weight_store" | "files", "pinned": bool, "why": ...}`). `store_wait_s`:
    how long to wait for the store's handle on `control`; None: the node has no store."""
    why = None
    if store_wait_s is not None:
        shared, why = _wait_for_store(control, store_wait_s)
        if shared is not None:
            try:
                tensors = list(shared.named_tensors())
                return tensors, {"from": "weight_store", "pinned": _pin(tensors, device)}
            except OSError as err:
                why = f"cannot map the store's shared memory ({err})"
        logger.warning("standby engine: reading the weights from the files (%s)", why)
    tensors = _own_copy(files, dtype, device)
    return tensors, {"from": "files", "pinned": device.type == "cuda",
                     **({"why": why} if why else {})}


def _wait_for_store(control, timeout_s: float):
    """The store's handle from the pool, or None and why not."""
    if not control.poll(timeout_s):
        return None, f"no word of the weight store from the pool in {timeout_s:.0f} s"
    kind, shared, why = control.recv()
    if kind != WEIGHTS_MESSAGE:
        return None, f"the pool sent {kind!r}, not the weight store"
    return shared, why


def _pin(tensors: list, device) -> bool:
    """Register the mapping (every view shares it) as pinned host memory, on a GPU. The
    standby keeps its tensors, so the mapping, for the process's whole life: a registration
    must not outlive its memory (CUDA would take a later mapping at that address for pinned)."""
    if device.type != "cuda" or not any(t.numel() for _, t in tensors):
        return False
    from pagedserve.replicas.models.device_copy import pin_in_place

    return pin_in_place(tensors[0][1], read_only=True)


def _own_copy(files, dtype, device) -> list:
    """The checkpoint read from its files, in the engine's dtype, pinned on a GPU."""
    from pagedserve.replicas.models.loader import read_safetensors, safetensors_files

    pin = device.type == "cuda"
    return [(name, t.to(dtype if t.is_floating_point() else t.dtype).pin_memory() if pin else t)
            for name, t in read_safetensors(safetensors_files(files.model_dir))]
