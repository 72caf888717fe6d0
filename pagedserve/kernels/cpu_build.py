"""Compiles a C kernel for this CPU on first use and caches the shared library.

The library is built with `-march=native`, so its cache key covers the source, the compiler
and its flags, and the CPU's model and feature flags: a cache directory shared by machines of
different CPUs never hands one a library it cannot run. With OpenMP the library is linked
against the runtime torch has already loaded (same soname), so torch's threads run it instead
of a second pool competing for the same cores. Without a working C compiler the build fails
with one warning and callers fall back to the torch references.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# Tried in order: the first that compiles and loads is used.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"),
    ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared"),  # no OpenMP runtime: 1 thread
)
_COMPILE_TIMEOUT_S = 120


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from `<name>.c` beside this file, or None (warned once) if it can't be."""
    source = Path(__file__).with_name(f"{name}.c")
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found (set CC); the %s kernel falls back to torch", name)
        return None
    errors = []
    for flags in _FLAG_SETS:
        target = _cache_root() / f"{name}-{_key(source, compiler, flags)}.so"
        try:
            if not target.exists():
                _compile(compiler, flags, source, target)
            return ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{' '.join(flags)}: {_tail(err)}")
    logger.warning("could not build the %s kernel, falling back to torch:\n%s", name,
                   "\n".join(errors))
    return None


def _compiler() -> str | None:
    configured = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(configured) or shutil.which("cc")


def _cache_root() -> Path:
    # The model cache's root (replicas/models/default_model.cache_dir); kernels/ imports nothing
    # else from pagedserve, so the variable is read here too.
    root = os.environ.get("PAGEDSERVE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "pagedserve") / "kernels"


def _key(source: Path, compiler: str, flags: tuple[str, ...]) -> str:
    digest = hashlib.sha256(source.read_bytes())
    for part in (compiler, _compiler_version(compiler), " ".join(flags), _cpu_signature()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


@functools.cache
def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    return done.stdout


@functools.cache
def _cpu_signature() -> str:
    """The CPU's model and feature flags (what `-march=native` compiles for)."""
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    seen = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            seen.setdefault(key.strip(), value.strip())
    return f"{platform.machine()} " + " | ".join(f"{k}={v}" for k, v in sorted(seen.items()))


def _compile(compiler: str, flags: tuple[str, ...], source: Path, target: Path) -> None:
    """Build into a temporary file beside `target`, then rename: concurrent builds are safe."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", partial, str(source), "-lm"], check=True,
                       capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        ctypes.CDLL(partial)  # loads (e.g. its OpenMP runtime resolves) before it is cached
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _tail(err: Exception) -> str:
    text = getattr(err, "stderr", None) or str(err)
    return "\n".join(text.strip().splitlines()[-5:])
