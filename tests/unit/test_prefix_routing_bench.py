"""The prefix-routing benchmark's workloads, server configs and comparisons (no server)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    return importlib.import_module("benchmarks.prefix_routing")


@pytest.fixture
def workloads(bench):
    return importlib.import_module("benchmarks.prefix_workloads")


def test_each_group_shares_its_prefix_and_requests_of_groups_interleave(workloads):
    shape = workloads.SharedPrefixShape(groups=3, per_group=4, prefix_len=32, suffix_len=8,
                                        output_len=5)
    w = workloads.shared_prefix_workload(shape, vocab_size=1000, seed=0)
    assert len(w.prompts) == 12 and w.output_lens == [5] * 12
    assert all(len(p) == 40 for p in w.prompts)
    groups = [w.prompts[i::3] for i in range(3)]  # request j of group g sits at j * 3 + g
    for group in groups:
        assert len({tuple(p[:32]) for p in group}) == 1  # one prefix per group
        assert len({tuple(p[32:]) for p in group}) == 4  # suffixes of their own
    assert len({tuple(g[0][:32]) for g in groups}) == 3  # groups differ
    assert [tuple(p[:32]) for p in w.prompts[:3]] != [tuple(w.prompts[0][:32])] * 3
    assert all(10 <= t < 1000 for p in w.prompts for t in p)  # clear of special tokens


def test_workloads_are_seeded(workloads):
    shape = workloads.SharedPrefixShape(2, 2, 16, 4, 1)
    first = workloads.shared_prefix_workload(shape, 500, seed=0)
    assert first == workloads.shared_prefix_workload(shape, 500, seed=0)
    assert first != workloads.shared_prefix_workload(shape, 500, seed=1)


def test_default_shapes_are_the_ones_asked_for(bench):
    shapes = bench.shapes(bench.parse_args(["--out", "/tmp/x.json"]))
    assert (shapes["prefix"].prefix_len, shapes["prefix"].suffix_len) == (512, 128)
    long = shapes["long_context"]
    assert (long.prefix_len, long.suffix_len, long.groups) == (4096, 500, 4)
    assert long.per_group > long.groups  # many questions per context


def test_a_shape_refuses_empty_sizes(workloads):
    with pytest.raises(ValueError, match="per_group"):
        workloads.SharedPrefixShape(2, 0, 16, 4, 1)


def test_best_hit_rate_counts_whole_blocks_of_later_requests(workloads):
    shape = workloads.SharedPrefixShape(groups=2, per_group=4, prefix_len=40, suffix_len=10,
                                        output_len=1)
    assert workloads.best_hit_rate(shape, block_size=16) == pytest.approx(3 * 32 / (4 * 50))


def test_server_configs_differ_only_in_the_router_policy(bench, tmp_path):
    args = bench.parse_args(["--out", str(tmp_path / "r.json")])
    configs = [yaml.safe_load(bench.server_config(args, Path("unused"), policy, 700,
                                                  tmp_path).read_text())
               for policy in ("admission", "serve")]
    apps = [c["applications"][0]["args"] for c in configs]
    assert [a["router"]["policy"] for a in apps] == ["admission", "serve"]
    assert all(a["num_replicas"] == 2 and a["engine"]["max_model_len"] == 700 for a in apps)
    for a in apps:
        a.pop("router")
    assert apps[0] == apps[1]


def test_kv_blocks_fit_the_asked_size(bench, tmp_path):
    import transformers

    transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2).save_pretrained(tmp_path)
    per_block = 2 * 2 * 2 * 16 * 16 * 2  # k and v, layers, kv heads, head dim, tokens, bf16
    assert bench.kv_blocks(tmp_path, 1.0, 16) == 2**30 // per_block


def test_comparisons_are_ours_over_serve_for_throughput_and_serve_over_ours_for_ttft(bench):
    def row(policy, tok_s, p90, hit):
        return {"workload": "prefix", "policy": policy, "tokens_per_s": tok_s,
                "ttft_s": {"p90": p90}, "prefix_hit_rate": hit}

    (ratio,) = bench.comparisons([row("admission", 300.0, 0.5, 0.7), row("serve", 200.0, 2.0, 0.4)])
    assert ratio == {"workload": "prefix", "tok_s_ratio": 1.5, "ttft_p90_ratio": 4.0,
                     "hit_rate_ours": 0.7, "hit_rate_serve": 0.4}
    assert bench.comparisons([row("serve", 1.0, 1.0, 0.0)]) == []
