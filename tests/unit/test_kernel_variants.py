"""No step after ready compiles a Triton kernel variant; the Triton cache is per node.

Each kernel's host wrapper is called with the shapes the engine's steps produce (graph and
eager decodes, mixed prefill/decode steps with their sliced tables, odd and even token
counts). The launches are recorded instead of run, and Triton's own specialization function,
given each parameter's `do_not_specialize` flags, must give every call the same variant key,
apart from the few compile-time variants listed (`IS_SPLIT`, `HAS_RESIDUAL`), which the start-up
forward passes and graph captures compile before ready.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")
libtriton = pytest.importorskip("triton._C.libtriton")
if not hasattr(libtriton, "native_specialize_impl"):
    pytest.skip("this Triton has no native_specialize_impl", allow_module_level=True)
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from pagedserve.kernels import triton_cache  # noqa: E402
from pagedserve.replicas.engine.step_inputs import FlatLayout  # noqa: E402

VARIANT_CONSTEXPRS = {"IS_SPLIT", "HAS_RESIDUAL"}  # bools: both compiled before ready
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 64, 16


class Recorder:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **kwargs)` only records."""

    def __init__(self, kernel: JITFunction) -> None:
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def variant_key(kernel: JITFunction, args: tuple, kwargs: dict) -> tuple:
    """What Triton keys a compiled variant on: each argument's specialization, the constexprs
    and the launch options."""
    names = [p.name for p in kernel.params]
    params = dict(zip(names, kernel.params, strict=True))
    bound = dict(zip(names, args, strict=False))
    key = []
    for name, value in bound.items():
        p = params[name]
        key.append((name, libtriton.native_specialize_impl(
            BaseBackend, value, p.is_const, not p.do_not_specialize,
            not p.do_not_specialize_on_alignment)))
    key += sorted((k, v) for k, v in kwargs.items() if k not in VARIANT_CONSTEXPRS)
    return tuple(key)


def assert_one_variant_per_group(recorder: Recorder) -> None:
    assert recorder.calls, "the wrapper launched nothing"
    groups: dict[tuple, set] = {}
    for args, kwargs in recorder.calls:
        group = tuple(sorted((k, kwargs[k]) for k in VARIANT_CONSTEXPRS if k in kwargs))
        groups.setdefault(group, set()).add(variant_key(recorder.kernel, args, kwargs))
    for group, keys in groups.items():
        assert len(keys) == 1, (
            f"{recorder.kernel.__name__} {group}: the step shapes need {len(keys)} variants:\n"
            + "\n".join(map(str, keys)))


def record(monkeypatch, module, *names: str) -> list[Recorder]:
    recorders = []
    for name in names:
        kernel = getattr(module, name)
        if not isinstance(kernel, JITFunction):
            pytest.skip(f"{name} is not a JITFunction here (TRITON_INTERPRET?)")
        recorders.append(Recorder(kernel))
        monkeypatch.setattr(module, name, recorders[-1])
    return recorders


def step_views(num_tokens: int, num_seqs: int, width: int):
    """The int64 views `step_inputs.upload` cuts from one tensor (ids, positions, slots, ...)."""
    layout = FlatLayout([num_tokens] * 3 + [num_seqs, num_seqs + 1, num_seqs * width, num_seqs,
                                            0, 0, 0], (num_seqs, width))
    flat = torch.zeros(sum(layout.lengths), dtype=torch.int64)
    return layout.views(flat, 0, 1, torch.device("cpu"))


def qkv_of(num_tokens: int):
    qkv = torch.zeros(num_tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=torch.bfloat16)
    q = qkv[:, : HEADS * HEAD_DIM].view(-1, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(-1, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM:].view(-1, KV_HEADS, HEAD_DIM)
    return q, k, v


def kv_cache(num_blocks: int = 64):
    return torch.zeros(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)


# (decode rows, prefill query lengths, block table width) of the steps an engine runs
STEPS = [(1, [], 1), (5, [], 3), (16, [], 17), (17, [], 32), (33, [], 7),
         (0, [7], 1), (0, [16, 33], 4), (1, [9], 2), (3, [17, 5], 5), (16, [1, 40], 3)]


def test_decode_shapes_share_variants(monkeypatch):
    mod = importlib.import_module("pagedserve.kernels.triton_decode")
    recorders = record(monkeypatch, mod, "_decode_kernel", "_merge_splits_kernel")
    cache = kv_cache()
    for batch, _, width in STEPS:
        if batch == 0:
            continue
        q, _, _ = qkv_of(batch)
        for table_width in (width, 128):  # eager (the step's longest table) and graph widths
            tables = torch.zeros(batch, table_width, dtype=torch.int32)
            lens = torch.ones(batch, dtype=torch.int32)
            mod.paged_decode_attention(q, cache[0], cache[1], tables, lens, 0.125)
    for recorder in recorders:
        assert_one_variant_per_group(recorder)
    splits = {kwargs["IS_SPLIT"] for _, kwargs in recorders[0].calls}
    assert splits == {True, False}, "the shapes should exercise both decode variants"


def test_prefill_and_store_kv_shapes_share_variants(monkeypatch):
    prefill = importlib.import_module("pagedserve.kernels.triton_prefill")
    store = importlib.import_module("pagedserve.kernels.triton_store_kv")
    (prefill_rec,) = record(monkeypatch, prefill, "_prefill_kernel")
    (store_rec,) = record(monkeypatch, store, "_store_kv_kernel")
    cache = kv_cache()
    for nd, lens, width in STEPS:
        num_tokens, num_seqs = nd + sum(lens), nd + len(lens)
        views = step_views(num_tokens, num_seqs, width)
        q, k, v = qkv_of(num_tokens)
        store.store_kv(k, v, cache[0], cache[1], views.slots)
        if not lens:
            continue
        meta = views.meta  # as the model slices it (`llama._paged_attention`)
        starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        prefill.paged_prefill_attention(q[nd:], cache[0], cache[1], meta.block_tables[nd:],
                                        starts, meta.context_lens[nd:] + 1, 0.125)
    assert_one_variant_per_group(prefill_rec)
    assert_one_variant_per_group(store_rec)


def test_fused_op_shapes_share_variants(monkeypatch):
    fused = importlib.import_module("pagedserve.kernels.fused_ops")
    recorders = record(monkeypatch, fused, "_rotary_kernel", "_add_rms_norm_kernel",
                       "_silu_mul_kernel")
    hidden = 256
    weight = torch.ones(hidden, dtype=torch.bfloat16)
    table = torch.zeros(2, 128, HEAD_DIM, dtype=torch.float32)
    for num_tokens in (1, 2, 7, 16, 17, 33, 48):
        views = step_views(num_tokens, 1, 1)
        q, _, _ = qkv_of(num_tokens)
        fused._rotary_triton(q, table, views.positions)
        x = torch.zeros(num_tokens, hidden, dtype=torch.bfloat16)
        fused._add_rms_norm_triton(x, None, weight, 1e-5)
        fused._add_rms_norm_triton(x, torch.zeros_like(x), weight, 1e-5)
        fused._silu_and_mul_triton(torch.zeros(num_tokens, 2 * hidden, dtype=torch.bfloat16))
    for recorder in recorders:
        assert_one_variant_per_group(recorder)


def test_all_reduce_norm_shapes_share_variants(monkeypatch):
    mod = importlib.import_module("pagedserve.kernels.all_reduce_norm")
    (recorder,) = record(monkeypatch, mod, "_all_reduce_add_rms_norm_kernel")
    hidden, max_rows = 256, 64
    weight = torch.ones(hidden, dtype=torch.bfloat16)
    ptrs = torch.zeros(2, dtype=torch.int64)
    counts = torch.zeros(mod.MAX_PROGRAMS, dtype=torch.int32)
    for rows in (1, 2, 16, 17, 32, 63):
        x = torch.zeros(rows, hidden, dtype=torch.bfloat16)
        for residual in (None, torch.zeros_like(x)):
            mod.all_reduce_add_rms_norm(x, residual, weight, 1e-5, ptrs, max_rows * hidden,
                                        counts, 0, 2)
    assert_one_variant_per_group(recorder)


def test_node_cache_dir_is_under_pagedserve_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    chosen = triton_cache.use_node_cache()
    assert os.environ["TRITON_CACHE_DIR"] == chosen
    assert chosen == str(tmp_path / "triton" / triton_cache.socket.gethostname())


def test_a_user_set_triton_cache_dir_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "ours"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "theirs"))
    assert triton_cache.use_node_cache() == str(tmp_path / "theirs")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "theirs")


def test_engine_process_sets_the_cache_dir_before_importing_triton(tmp_path):
    """`run_engine_core` (the spawned engine's entry) sets it before anything imports triton;
    a model that does not exist ends the start right after the imports."""
    code = textwrap.dedent(f"""
        import os, sys
        seen = []
        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name == "triton":
                    seen.append(os.environ.get("TRITON_CACHE_DIR"))
                return None
        sys.meta_path.insert(0, Watch())
        from pagedserve.replicas.engine.engine_core import run_engine_core
        class Conn:
            def send(self, message):
                print(message[0])
        run_engine_core({{"model": {str(tmp_path / "missing")!r}}}, Conn())
        print(seen[:1], os.environ.get("TRITON_CACHE_DIR"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    env["PAGEDSERVE_CACHE"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.split("\n")
    expected = str(tmp_path / "triton" / triton_cache.socket.gethostname())
    assert out[0] == "dead"
    assert out[1] == f"[{expected!r}] {expected}", out
