"""Where Triton keeps its compiled kernels: one directory per node under `PAGEDSERVE_CACHE`.

Every engine on a node then finds the variants an earlier engine compiled there (a second
replica compiles nothing), and the directory outlives the process. It is per node, named by
the host, because `PAGEDSERVE_CACHE` may sit on a file system that several nodes share.

Imports nothing but the standard library: it must run before triton is imported.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

CACHE_ENV = "TRITON_CACHE_DIR"


def node_cache_dir() -> Path:
    """`$PAGEDSERVE_CACHE/triton/<host name>` (default root: `~/.cache/pagedserve`)."""
    root = os.environ.get("PAGEDSERVE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "pagedserve"
    return base / "triton" / (socket.gethostname() or "localhost")


def use_node_cache() -> str:
    """Point this process (and the processes it starts) at the node's Triton cache.

    A `TRITON_CACHE_DIR` the user set is kept. Returns the directory in use.
    """
    if not os.environ.get(CACHE_ENV):
        os.environ[CACHE_ENV] = str(node_cache_dir())
    return os.environ[CACHE_ENV]


class VariantCounter:
    """How many Triton kernel variants this process has loaded since `install` (each one
    compiled, or read from the cache directory), by kernel name.

    Installs Triton's post-compile hook; a variant used before is found in memory and is not
    counted again. Benchmarks read it to show that no step after ready compiled anything.
    """

    def __init__(self) -> None:
        self.by_kernel: dict[str, int] = {}
        self._previous = None

    @property
    def total(self) -> int:
        return sum(self.by_kernel.values())

    def install(self) -> VariantCounter:
        from triton import knobs  # only a process that runs Triton kernels counts them

        self._previous = knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_post_compile_hook = self._hook
        return self

    def _hook(self, *args, **kwargs):
        name = getattr(kwargs.get("fn"), "name", None) or "?"  # a JitFunctionInfo
        self.by_kernel[name] = self.by_kernel.get(name, 0) + 1
        if self._previous is not None:
            return self._previous(*args, **kwargs)
        return False
