"""A model's weight load, first and again, in one fresh process: what a process's first use costs.

    python benchmarks/first_load.py --device cuda     # random-weight 1B shape, bf16
    python benchmarks/first_load.py                   # CPU, the embedded default model

Prints: the imports; reading the checkpoint into (pinned, on a GPU) host memory; three loads
of the model from those tensors (as a `host` standby's adoption does); one copy of the whole
checkpoint's size from pinned memory; one load from the files (page cache warm).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import sys, time
t0 = time.perf_counter()
import torch
from pagedserve.replicas.models.loader import load_model, read_safetensors, safetensors_files
from pagedserve.replicas.models.model_files import load_model_files
imported = time.perf_counter() - t0
model_dir, device_name = sys.argv[1], sys.argv[2]
device = torch.device(device_name)
cuda = device.type == "cuda"
dtype = torch.bfloat16 if cuda else torch.float32
sync = torch.cuda.synchronize if cuda else (lambda: None)
files = load_model_files(model_dir, progress=False)
t1 = time.perf_counter()
tensors = [(n, t.to(dtype).pin_memory() if cuda else t.to(dtype))
           for n, t in read_safetensors(safetensors_files(files.model_dir))]
print(f"imports {imported:.2f} s, read into host memory {time.perf_counter() - t1:.2f} s",
      flush=True)
for i in range(3):
    sync(); started = time.perf_counter()
    model = load_model(files.spec, files.model_dir, dtype, device, progress=False, tensors=tensors)
    sync(); print(f"load from host memory {i}: {time.perf_counter() - started:.3f} s", flush=True)
    del model
if cuda:
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    block = torch.empty(total // 2, dtype=torch.bfloat16).pin_memory()
    sync(); started = time.perf_counter()
    block.to(device, non_blocking=True); sync()
    took = time.perf_counter() - started
    print(f"one {total / 1e9:.2f} GB pinned copy: {took:.3f} s ({total / 1e9 / took:.1f} GB/s)")
sync(); started = time.perf_counter()
load_model(files.spec, files.model_dir, dtype, device, progress=False)
sync(); print(f"load from the files: {time.perf_counter() - started:.3f} s", flush=True)
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", help="HF model directory (default: see above)")
    args = p.parse_args()
    model = args.model
    if model is None and args.device == "cuda":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import random_model

        out = Path(tempfile.mkdtemp(prefix="first-load-")) / "llama-1b"
        model = str(random_model.write_random_llama(out, "1b", device="cuda"))
    if model is None:
        from pagedserve.replicas.models.registry import resolve_model_dir

        model = str(resolve_model_dir(None, progress=False))
    device = "cuda:0" if args.device == "cuda" else "cpu"
    subprocess.run([sys.executable, "-c", CHILD, model, device], check=True)


if __name__ == "__main__":
    main()
