"""Helpers shared by the benchmarks: timing, peak memory, machine facts, table, JSON and PNG."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import resource
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers

import pagedserve

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def timed(device: str, fn):
    """Run fn once; return (its result, wall seconds), waiting for the GPU on cuda."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


_NOT_OWN = object()


@contextlib.contextmanager
def timed_calls(targets: list[tuple[object, str, str]], seconds: dict[str, float],
                calls: dict[str, int] | None = None):
    """While open, add the host seconds of every call of each `(owner, method, label)` in
    `targets` to `seconds[label]`, and count the calls in `calls`; the methods are put back
    after. An owner is a class (every instance is timed) or one object."""
    saved = []
    for owner, name, label in targets:
        saved.append((owner, name, vars(owner).get(name, _NOT_OWN)))
        setattr(owner, name, timed_call(getattr(owner, name), label, seconds, calls))
    try:
        yield
    finally:
        for owner, name, own in reversed(saved):
            if own is _NOT_OWN:
                delattr(owner, name)  # it was the class's (or a base's) again
            else:
                setattr(owner, name, own)


def timed_call(method, label: str, seconds: dict[str, float],
               calls: dict[str, int] | None = None):
    """`method` wrapped to add each call's host seconds to `seconds[label]` (and count it)."""

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start
            if calls is not None:
                calls[label] = calls.get(label, 0) + 1

    return call


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window (GPU allocator peak on cuda, RSS high-water mark on cpu)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # hand freed heap back to the OS, then restart the kernel's RSS high-water mark
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux/glibc: the peak stays the process-wide one from getrusage


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.exists() and (m := re.search(r"VmHWM:\s+(\d+) kB", status.read_text())):
        return int(m.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_kind(device: str) -> str:
    return "cuda max_memory_allocated" if device == "cuda" else "process RSS high-water mark"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    model = m.group(1).strip() if (m := re.search(r"model name\s*:\s*(.+)", text)) else ""
    return f"{model or platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def environment(device: str) -> dict:
    """What a result file needs to be compared with another: date, machine and versions."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "versions": {"pagedserve": pagedserve.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def default_out(name: str, device: str, out: Path | None = None) -> Path:
    """The results file: `out` if it names a file, else a dated name in `out` (a directory)
    or in `benchmarks/results/`. Resolved before the run, so a long run never fails at the end."""
    dated = f"{name}-{device}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    if out is None:
        return RESULTS_DIR / dated
    return out / dated if out.is_dir() else out


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Render rows as a fixed-width table; columns are (key, header, format spec), None prints '-'."""
    lines = [[header for _, header, _ in columns]]
    lines += [["-" if r[k] is None else format(r[k], f) for k, _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]

    def render(line: list[str]) -> str:
        rest = [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        return "  ".join([line[0].ljust(widths[0]), *rest])

    return "\n".join(render(line) for line in lines)


def write_results(result: dict, out: Path, bars: dict[str, float], ylabel: str) -> None:
    """Write the JSON file, and a bar chart beside it when matplotlib is installed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(bars), list(bars.values()))
    ax.set_ylabel(ylabel)
    ax.set_title(out.stem)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    plt.close(fig)
