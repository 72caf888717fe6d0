"""A tensor-parallel rank that dies while starting: `LLM(...)` raises, naming the rank and its
error, within seconds; it never waits at the rendezvous for a rank that is gone.

Run the way a new user does: a script piped to `python -` (its main module cannot be re-run
by a spawned child), and `LLM(...)` in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pagedserve import LLM

pytestmark = pytest.mark.slow

BOUND_S = 60.0
FAULT = "PAGEDSERVE_TP_START_FAULT"
REPO = Path(__file__).resolve().parents[2]


def _piped_script(model_dir: Path) -> str:
    return textwrap.dedent(f"""
        from pagedserve import LLM, SamplingParams
        llm = LLM({str(model_dir)!r}, tensor_parallel_size=2, device="cpu",
                  num_kvcache_blocks=64, progress=False)
        out = llm.generate(["w5 w6 w7"], SamplingParams(temperature=0, max_tokens=4),
                           use_tqdm=False)
        print("TOKENS", out[0].outputs[0].token_ids)
        llm.shutdown()
    """)


def _run_piped(script: str, fault_rank: str | None) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != FAULT}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if fault_rank is not None:
        env[FAULT] = fault_rank
    started = time.monotonic()
    # A hang would show as TimeoutExpired: the bound is the test's own, not pytest's.
    out = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                         env=env, timeout=BOUND_S + 30)
    return out, time.monotonic() - started


def test_piped_script_runs_tensor_parallel(tiny_llama):
    out, _ = _run_piped(_piped_script(tiny_llama), None)
    assert out.returncode == 0, out.stderr[-3000:]
    tokens = next(line for line in out.stdout.splitlines() if line.startswith("TOKENS"))
    assert len(tokens.split(",")) == 4, out.stdout


def test_piped_script_raises_when_rank1_dies_at_start(tiny_llama):
    out, took = _run_piped(_piped_script(tiny_llama), "1")
    assert out.returncode != 0, out.stdout
    assert took < BOUND_S
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pagedserve.replicas.parallel.group.RankStartError"), out.stderr[-3000:]
    assert "tensor-parallel rank 1 exited with code 1" in last
    assert f"{FAULT}=1" in last  # the rank's own error reaches the user


def test_llm_in_process_raises_and_can_start_again(tiny_llama, monkeypatch):
    monkeypatch.setenv(FAULT, "1")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="tensor-parallel rank 1 exited with code 1"):
        LLM(str(tiny_llama), tensor_parallel_size=2, device="cpu", num_kvcache_blocks=64,
            progress=False)
    assert time.monotonic() - started < BOUND_S
    monkeypatch.delenv(FAULT)
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, device="cpu", num_kvcache_blocks=64,
              progress=False)  # the failed start left no group or process behind
    try:
        assert llm.generate("w5 w6", use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.shutdown()
