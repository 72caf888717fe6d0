"""The throughput benchmark runs end to end in-process and reports what it generated."""

from __future__ import annotations

import importlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


STALL = [4, 4, 4]


class _StreamingStandIn(BaseHTTPRequestHandler):
    """Answers `/v1/completions` as a streamed OpenAI server would: one text chunk per token
    (a millisecond apart), then the usage chunk. The prompt `STALL` gets its first chunk and
    then nothing for 5 s, as a stuck request would."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if body["prompt"] == STALL:
            self._event({"choices": [{"index": 0, "text": "x"}]})
            time.sleep(5.0)
            return
        for _ in range(body["max_tokens"]):
            self._event({"choices": [{"index": 0, "text": "x"}]})
            time.sleep(0.001)
        self._event({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, chunk: dict) -> None:
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stand_in_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StreamingStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def serving(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    return importlib.import_module("benchmarks.serving")


def test_serving_clients_start_together_and_report_rate_and_cpu(serving, throughput,
                                                                 stand_in_url):
    workload = throughput.make_workload(throughput.parse_args(
        ["--num-prompts", "12", "--max-prompt-len", "8", "--output-len", "5"]), 100)
    at_once = serving.drive(stand_in_url, "m", workload, float("inf"), 3, seed=0)
    assert (at_once["requests"], at_once["errors"], at_once["output_tokens"]) == (12, 0, 60)
    paced = serving.drive(stand_in_url, "m", workload, 40.0, 3, seed=0)
    assert paced["errors"] == 0 and paced["request_rate"] == 40.0
    # a loaded machine may send late; the lag is measured
    assert -0.01 <= paced["send_lag_s"]["p50"] <= paced["send_lag_s"]["p99"] < 10
    assert 0 < paced["achieved_rate_per_s"] < float("inf")
    assert paced["client_cpu_s"] > 0 and 0 < paced["client_busiest_cpu_share"] < 1.5


def test_achieved_arrival_rate():
    from pagedserve.bench.serving_stats import arrival_rate

    assert arrival_rate([10.0, 10.5, 11.0]) == 2.0
    assert arrival_rate([3.0, 3.0]) == float("inf") and arrival_rate([3.0]) == 0.0


def test_serving_start_time_is_common_to_every_client(stand_in_url):
    from pagedserve.bench.serving_client import run_client_processes

    shards = [[(0.0, [5, 6], 2), (0.05, [7], 2)] for _ in range(3)]
    runs, start = run_client_processes(stand_in_url, "m", shards)
    scheduled = sorted({o.scheduled for run in runs for o in run.outcomes})
    assert scheduled == [start, start + 0.05]
    # sent at (asyncio may wake a clock tick early) or after its time
    assert all(o.sent >= o.scheduled - 0.01 and o.error is None
               for run in runs for o in run.outcomes)


def test_a_stalled_request_ends_with_an_error_and_does_not_hold_the_run(stand_in_url):
    from pagedserve.bench.serving_client import run_client_processes

    shards = [[(0.0, [5, 6], 2), (0.0, STALL, 2)], [(0.0, [7], 2)]]
    runs, _ = run_client_processes(stand_in_url, "m", shards, stall_timeout_s=1.0)
    outcomes = [o for run in runs for o in run.outcomes]
    assert outcomes[0].error is None and outcomes[2].error is None
    stalled = outcomes[1]
    assert "ReadTimeout" in stalled.error
    assert stalled.end - stalled.sent < 4.0  # ended by the timeout, not by the 5 s stall


def test_serving_sweep_runs_rates_up_to_saturation_and_plots(serving, throughput, stand_in_url,
                                                              tmp_path, capsys):
    workload = throughput.make_workload(throughput.parse_args(
        ["--num-prompts", "6", "--max-prompt-len", "8", "--output-len", "3"]), 100)
    args = serving.parse_args(["--sweep", "--clients", "2", "--out", str(tmp_path / "s.json")])
    rows = serving.sweep(stand_in_url, "m", workload, args, seed=0)
    assert [r["request_rate"] for r in rows[:1]] == [float("inf")]
    saturation = rows[0]["requests_per_s"]
    assert [r["request_rate"] for r in rows[1:]] == pytest.approx(
        [f * saturation for f in serving.SWEEP_FRACTIONS])
    assert all(r["errors"] == 0 and r["ttft_s"]["p99"] >= r["ttft_s"]["p50"] for r in rows)
    serving.print_sweep(rows)
    assert "ttft p99 (s)" in capsys.readouterr().out
    png = serving.plot_sweep(rows, tmp_path / "sweep.png")
    assert png is not None and png.stat().st_size > 0
    assert serving.parse_args(["--sweep", "1,2.5"]).sweep == [1.0, 2.5]
    with pytest.raises(SystemExit):
        serving.parse_args(["--sweep", "0,x"])


def test_serving_repeats_pair_each_http_run_with_its_engine_direct_run(serving):
    runs = [{"tokens_per_s": 90.0, "errors": 0, "ttft_s": {"p50": 0.5}},
            {"tokens_per_s": 99.0, "errors": 1, "ttft_s": {}}]
    rows = serving.repeat_rows(runs, [100.0, 110.0], seed=7)
    assert [(r["run"], r["seed"]) for r in rows] == [(0, 7), (1, 8)]
    assert [r["http_over_direct"] for r in rows] == [0.9, 0.9]
    assert rows[1]["errors"] == 1 and rows[1]["ttft_p50_s"] is None
    assert serving.repeat_rows(runs, None, seed=0)[0]["http_over_direct"] is None


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--repeats", "2", "--sweep"]])
def test_serving_rejects_repeats_it_cannot_run(serving, argv):
    with pytest.raises(SystemExit):
        serving.parse_args(argv)
