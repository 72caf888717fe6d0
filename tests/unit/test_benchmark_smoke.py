"""The throughput benchmark runs end to end in-process and reports what it generated."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    return importlib.import_module("benchmarks.throughput")


def test_workload_is_seeded_and_in_range(throughput):
    argv = ["--num-prompts", "8", "--min-prompt-len", "5", "--max-prompt-len", "9",
            "--output-len", "3"]
    args = throughput.parse_args(argv)
    first, again = throughput.make_workload(args, 100), throughput.make_workload(args, 100)
    assert first == again
    assert len(first.prompts) == 8 and first.output_lens == [3] * 8
    assert all(5 <= len(p) <= 9 for p in first.prompts)
    assert all(throughput.FIRST_TOKEN_ID <= t < 100 for p in first.prompts for t in p)
    other = throughput.make_workload(throughput.parse_args([*argv, "--seed", "1"]), 100)
    assert other.prompts != first.prompts


def test_cuda_defaults_draw_output_lengths(throughput):
    args = throughput.parse_args(["--device", "cuda", "--num-prompts", "16"])
    assert (args.min_prompt_len, args.max_prompt_len, args.output_range) == (100, 1024, (100, 1024))
    assert args.dtype == "bfloat16"
    lens = throughput.make_workload(args, 1000).output_lens
    assert all(100 <= n <= 1024 for n in lens) and len(set(lens)) > 1


def test_repeats_give_a_ratio_per_seed_and_their_median(throughput):
    base = throughput.Row("pagedserve", 4, tokens_per_s=100.0, repeat_tokens_per_s=[100.0, 50.0])
    tp2 = throughput.Row("pagedserve-tp2", 4, tokens_per_s=150.0,
                         repeat_tokens_per_s=[170.0, 80.0])
    assert (throughput.seed_ratios(tp2, base, seed=0)
            == " (seeds 0-2: 1.50x, 1.70x, 1.60x; median 1.60x)")
    assert throughput.seed_ratios(throughput.Row("x", 4, tokens_per_s=1.0), base, seed=0) == ""
    assert throughput.scaling(tp2, base) == [1.5, 1.7, 1.6]


@pytest.mark.slow
def test_benchmark_runs_against_both_peers(throughput, default_model_dir, tmp_path):
    out = tmp_path / "throughput.json"
    result = throughput.main(["--model", str(default_model_dir), "--num-prompts", "2",
                              "--output-len", "4", "--max-prompt-len", "32",
                              "--peers", "hf-generate,hf-cb", "--out", str(out)])

    assert json.loads(out.read_text()) == result
    assert result["workload"]["num_prompts"] == 2 and result["workload"]["output_len"] == [4, 4]
    assert result["versions"]["transformers"] and result["device_name"]
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["pagedserve", "hf-generate", "hf-cb"]
    for name, row in rows.items():
        assert row["skipped"] is None, row["skipped"]
        assert (row["requests"], row["output_tokens"]) == (2, 8)
        assert row["tokens_per_s"] > 0 and row["peak_mem_mib"] > 0
        assert (row["ratio"] is None) == (name == "pagedserve")


@pytest.mark.slow
def test_peers_only_run_reports_no_ratio(throughput, default_model_dir, tmp_path):
    result = throughput.main(["--model", str(default_model_dir), "--num-prompts", "2",
                              "--output-len", "2", "--max-prompt-len", "16",
                              "--tensor-parallel-sizes", "", "--peers", "hf-generate",
                              "--out", str(tmp_path / "peers.json")])
    (row,) = result["rows"]
    assert row["name"] == "hf-generate" and row["tokens_per_s"] > 0 and row["ratio"] is None


def test_step_times_reports_the_split(default_model_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    step_times = importlib.import_module("benchmarks.step_times")
    step_times.main(["--model", str(default_model_dir), "--num-prompts", "3", "--output-len", "3",
                     "--max-prompt-len", "16"])
    out = capsys.readouterr().out
    assert "9 tokens in" in out
    assert "steps with prefill: 1," in out and "decode-only steps: 2," in out
    from pagedserve.replicas.engine.model_runner import ModelRunner

    assert ModelRunner.execute_async.__name__ == "execute_async"  # the timing wrapper is gone


def test_step_times_overlap_splits_host_time(default_model_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    step_times = importlib.import_module("benchmarks.step_times")
    step_times.main(["--model", str(default_model_dir), "--num-prompts", "3", "--output-len", "3",
                     "--max-prompt-len", "16", "--overlap"])
    out = capsys.readouterr().out
    assert "tensor_parallel_size=1" in out and "9 tokens in" in out and "3 steps" in out
    assert "device_wait:" in out and "launch:" in out and "publish: 0.00 s" in out  # no ranks
    from pagedserve.replicas.engine.model_runner import ModelRunner
    from pagedserve.replicas.engine.sampler import PendingSample

    assert ModelRunner.execute_async.__name__ == "execute_async"  # the wrappers are gone
    assert PendingSample.result.__name__ == "result"


def test_first_run_on_a_fresh_engine_is_reported_beside_the_last(throughput, default_model_dir,
                                                                 tmp_path, capsys):
    result = throughput.main(["--model", str(default_model_dir), "--num-prompts", "2",
                              "--output-len", "3", "--max-prompt-len", "16", "--repeats", "3",
                              "--peers", "", "--out", str(tmp_path / "t.json")])
    (row,) = result["rows"]
    assert len(row["repeat_tokens_per_s"]) == 2
    assert row["first_run_tokens_per_s"] == row["tokens_per_s"]  # no warm-up run before it
    assert row["steady_tokens_per_s"] == row["repeat_tokens_per_s"][-1]
    assert row["first_over_steady"] == row["tokens_per_s"] / row["steady_tokens_per_s"]
    assert row["kernel_variants_per_run"] is None  # no Triton on a CPU run
    assert "1st/last" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["throughput", "serving", "soak"])
def test_out_may_name_a_directory(monkeypatch, tmp_path, name):
    """`--out DIR` writes a dated file in DIR (a directory used to fail at the end of a run)."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    module = importlib.import_module(f"benchmarks.{name}")
    args = module.parse_args(["--out", str(tmp_path)])
    out = Path(args.out)
    assert out.parent == tmp_path and out.suffix == ".json" and not out.exists()
