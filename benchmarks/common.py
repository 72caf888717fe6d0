"""Helpers shared by the benchmarks: timing, peak memory, machine facts, table, JSON and PNG."""

from __future__ import annotations

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


def default_out(name: str, device: str) -> Path:
    return RESULTS_DIR / f"{name}-{device}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


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
