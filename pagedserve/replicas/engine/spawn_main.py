"""Start a 'spawn' child without re-running the parent's main module in it.

`multiprocessing`'s spawn re-imports the parent's `__main__` in every child (as `__mp_main__`),
so that functions defined there can be unpickled. The engine process needs nothing from it
(its entry point and arguments live in pagedserve), and in a Ray worker that main module is
Ray's `default_worker.py`, which imports Ray: half a second of every engine start on a 2-core
CPU, for nothing.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import threading
from collections.abc import Iterator

_LOCK = threading.Lock()


@contextlib.contextmanager
def without_parent_main() -> Iterator[None]:
    """Processes spawned inside this block skip the parent's main module.

    Spawn names the main module to the child by its spec's name when it has one, and the child
    skips a module named `__main__`; so the main module gets that spec for the block.
    """
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None:
        yield  # started with -m (or interactive): the child does not re-run a script
        return
    with _LOCK:
        main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
        try:
            yield
        finally:
            main.__spec__ = None
