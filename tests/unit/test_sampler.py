"""Sampler: greedy, temperature, top-k/p, min-p, penalties, seeds, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.replicas.engine.sampler import Sampler
from pagedserve.replicas.engine.sequence import Sequence
from pagedserve.sampling_params import SamplingParams

EOS = 0
VOCAB = 32


def make_seq(prompt=(3, 4, 5), output=(), index: int = 0, **params) -> Sequence:
    seq = Sequence("r", index, list(prompt), SamplingParams(**params), block_size=4)
    for token in output:
        seq.append_token(token)
    return seq


def random_logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draw(logits_row: torch.Tensor, num: int, **params) -> torch.Tensor:
    """`num` independent draws of one distribution (one sequence repeated over `num` rows)."""
    seq = make_seq(**params)
    result = Sampler([EOS])(logits_row.expand(num, -1).contiguous(), [seq] * num)
    return torch.tensor(result.token_ids)


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token of zero probability"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


# 99.9% quantiles of the chi-square distribution by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}


# greedy and filtering


def test_greedy_is_argmax():
    logits = random_logits(8)
    seqs = [make_seq(temperature=0.0) for _ in range(8)]
    result = Sampler([EOS])(logits, seqs)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 8


def test_sampler_does_not_modify_the_logits():
    logits = random_logits(2)
    before = logits.clone()
    seqs = [make_seq(output=(1, 2), temperature=0.0, repetition_penalty=1.5,
                     presence_penalty=1.0, min_tokens=5),
            make_seq(temperature=1.0, top_k=3)]
    Sampler([EOS])(logits, seqs)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0, 100.0])
def test_top_k_one_equals_greedy(temperature):
    torch.manual_seed(0)
    logits = random_logits(64, seed=1)
    seqs = [make_seq(temperature=temperature, top_k=1) for _ in range(64)]
    assert Sampler([EOS])(logits, seqs).token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_only_the_top_token():
    torch.manual_seed(0)
    logits = random_logits(64, seed=2)
    seqs = [make_seq(temperature=3.0, top_p=1e-6) for _ in range(64)]
    assert Sampler([EOS])(logits, seqs).token_ids == logits.argmax(dim=-1).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    samples = draw(probs.log(), 20_000, top_p=0.7)
    kept = torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8
    assert set(samples.tolist()) == {0, 1}
    assert chi_square(samples, kept) < CHI2_999[1]


def test_top_k_distribution_is_renormalized_top_k():
    torch.manual_seed(1)
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    samples = draw(probs.log(), 20_000, top_k=3)
    kept = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85
    assert set(samples.tolist()) == {1, 3, 4}
    assert chi_square(samples, kept) < CHI2_999[2]


def test_min_p_drops_tokens_below_fraction_of_the_top():
    torch.manual_seed(2)
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    samples = draw(probs.log(), 20_000, min_p=0.5)  # cutoff 0.2
    kept = torch.tensor([0.4, 0.3, 0.0, 0.0, 0.0]) / 0.7
    assert set(samples.tolist()) == {0, 1}
    assert chi_square(samples, kept) < CHI2_999[1]
    samples = draw(probs.log(), 20_000, min_p=0.3)  # cutoff 0.12: 0.1 and 0.05 go
    assert set(samples.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_softmax(temperature):
    torch.manual_seed(3)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -0.5])
    samples = draw(logits, 40_000, temperature=temperature)
    expected = (logits / temperature).softmax(dim=-1)
    assert chi_square(samples, expected) < CHI2_999[5]
    # And not merely close to greedy or uniform.
    assert chi_square(samples, torch.full((6,), 1 / 6)) > 100


def test_mixed_batch_rows_follow_their_own_settings():
    torch.manual_seed(4)
    logits = random_logits(3, seed=5)
    seqs = [make_seq(temperature=0.0), make_seq(temperature=2.0, top_k=1),
            make_seq(temperature=1.0, top_p=1e-6)]
    for _ in range(20):
        assert Sampler([EOS])(logits, seqs).token_ids == logits.argmax(dim=-1).tolist()


# seeds


def seeded_draws(seed: int, steps: int = 30, index: int = 0) -> list[int]:
    seq = make_seq(seed=seed, index=index)
    logits = torch.zeros(1, VOCAB)  # uniform: every draw depends on the generator only
    return [Sampler([EOS])(logits, [seq]).token_ids[0] for _ in range(steps)]


def test_same_seed_reproduces_the_sequence_of_draws():
    torch.manual_seed(5)
    first = seeded_draws(1234)
    torch.manual_seed(999)  # the global generator must not matter
    second = seeded_draws(1234)
    assert first == second
    assert len(set(first)) > 5  # the draws do vary from step to step


def test_different_seeds_or_indices_differ():
    assert seeded_draws(1) != seeded_draws(2)
    assert seeded_draws(7, index=0) != seeded_draws(7, index=1)


def test_seeded_row_is_independent_of_batch_neighbours():
    logits = random_logits(1, seed=6)
    alone_seq = make_seq(seed=42, temperature=1.5)
    alone = [Sampler([EOS])(logits, [alone_seq]).token_ids[0] for _ in range(20)]
    batched_seq = make_seq(seed=42, temperature=1.5)
    neighbour = make_seq(temperature=1.0)
    batch_logits = torch.cat([random_logits(1, seed=7), logits, random_logits(1, seed=8)])
    batched = [
        Sampler([EOS])(batch_logits, [neighbour, batched_seq, neighbour]).token_ids[1]
        for _ in range(20)
    ]
    assert alone == batched


def test_unseeded_draws_vary():
    torch.manual_seed(6)
    seq = make_seq()
    logits = torch.zeros(1, VOCAB)
    draws = {Sampler([EOS])(logits, [seq]).token_ids[0] for _ in range(30)}
    assert len(draws) > 5


# penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5, -0.5, 4.0, 1.0]])
    seq = make_seq(prompt=(0, 1), output=(4, 5, 4), repetition_penalty=2.0)
    Sampler([EOS])._apply_penalties(logits, [seq])
    expected = torch.tensor([[1.0, -4.0, 3.0, -1.0, 0.25, -1.0, 4.0, 1.0]])
    torch.testing.assert_close(logits, expected)


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 3] = 2.0  # in the prompt
    logits[0, 9] = 1.5
    plain = make_seq(prompt=(3,), temperature=0.0)
    penalised = make_seq(prompt=(3,), temperature=0.0, repetition_penalty=1.5)
    assert Sampler([EOS])(logits, [plain]).token_ids == [3]
    assert Sampler([EOS])(logits, [penalised]).token_ids == [9]


def test_presence_and_frequency_penalties_follow_openai_on_output_only():
    logits = torch.zeros(1, 10)
    seq = make_seq(prompt=(9, 9, 8), output=(5, 5, 5, 7), presence_penalty=0.5,
                   frequency_penalty=0.25)
    Sampler([EOS])._apply_penalties(logits, [seq])
    expected = torch.zeros(1, 10)
    expected[0, 5] = -(3 * 0.25 + 0.5)
    expected[0, 7] = -(1 * 0.25 + 0.5)
    torch.testing.assert_close(logits, expected)  # prompt tokens 8 and 9 untouched


def test_negative_presence_penalty_encourages_repeats():
    logits = torch.zeros(1, 10)
    logits[0, 2] = 0.3
    seq = make_seq(output=(6,), temperature=0.0, presence_penalty=-1.0)
    assert Sampler([EOS])(logits, [seq]).token_ids == [6]


def test_no_penalty_leaves_logits_unchanged():
    logits = random_logits(1, seed=9)
    before = logits.clone()
    Sampler([EOS])._apply_penalties(logits, [make_seq(output=(1, 2, 2))])
    assert torch.equal(logits, before)


# min_tokens and stops


def eos_favoured_logits() -> torch.Tensor:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 1] = 9.0  # a stop token id
    logits[0, 2] = 8.0
    return logits


def test_min_tokens_blocks_eos_and_stop_token_ids_until_reached():
    sampler = Sampler([EOS])
    logits = eos_favoured_logits()
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    assert sampler(logits, [make_seq(**params)]).token_ids == [2]
    assert sampler(logits, [make_seq(output=(2,), **params)]).token_ids == [2]
    assert sampler(logits, [make_seq(output=(2, 2), **params)]).token_ids == [EOS]


def test_min_tokens_with_ignore_eos_blocks_only_stop_token_ids():
    sampler = Sampler([EOS])
    logits = eos_favoured_logits()
    seq = make_seq(temperature=0.0, min_tokens=3, stop_token_ids=[1], ignore_eos=True)
    logits[0, EOS] = 8.5
    logits[0, 1] = 10.0
    assert sampler(logits, [seq]).token_ids == [EOS]  # eos is an ordinary token here


def test_min_tokens_blocks_every_eos_id_when_sampling():
    torch.manual_seed(7)
    logits = torch.zeros(200, VOCAB)
    logits[:, [EOS, 1]] = 5.0  # most of the mass on the two eos ids
    sampler = Sampler([EOS, 1])
    seq = make_seq(min_tokens=1)
    draws = [sampler(logits, [seq] * 200).token_ids for _ in range(5)]
    assert all(t not in (EOS, 1) for row in draws for t in row)
    free = make_seq(min_tokens=0)
    assert any(t in (EOS, 1) for t in sampler(logits, [free] * 200).token_ids)


def test_min_tokens_ignores_stop_ids_outside_the_vocabulary():
    logits = eos_favoured_logits()
    seq = make_seq(temperature=0.0, min_tokens=2, stop_token_ids=[1, VOCAB + 5])
    result = Sampler([EOS, VOCAB + 100])(logits, [seq])
    assert result.token_ids == [2]


def test_eos_is_not_blocked_without_min_tokens():
    logits = eos_favoured_logits()
    assert Sampler([EOS])(logits, [make_seq(temperature=0.0)]).token_ids == [EOS]


# logprobs


def test_logprobs_are_from_the_raw_distribution():
    logits = random_logits(1, seed=10)
    raw = logits.log_softmax(dim=-1)[0]
    top = raw.topk(4)
    # Penalise the raw argmax so the sampled token differs from it.
    best = int(top.indices[0])
    seq = make_seq(prompt=(best,), temperature=0.0, repetition_penalty=100.0, logprobs=4)
    result = Sampler([EOS])(logits, [seq])
    (token,) = result.token_ids
    assert token != best
    entry = result.logprobs[0]
    assert set(entry) == {token, *top.indices.tolist()}
    for tid, value in entry.items():
        assert value == pytest.approx(float(raw[tid]), abs=1e-6)


def test_logprobs_zero_returns_only_the_sampled_token():
    torch.manual_seed(8)
    logits = random_logits(2, seed=11)
    raw = logits.log_softmax(dim=-1)
    seqs = [make_seq(logprobs=0, temperature=2.0), make_seq(temperature=1.0)]
    result = Sampler([EOS])(logits, seqs)
    token = result.token_ids[0]
    assert result.logprobs[0] == pytest.approx({token: float(raw[0, token])}, abs=1e-6)
    assert result.logprobs[1] is None


def test_logprobs_include_sampled_token_outside_top_k():
    logits = torch.ones(1, VOCAB)
    logits[0, 5] = 4.0
    logits[0, 6] = 3.0
    logits[0, 7] = -3.0
    seq = make_seq(prompt=(5, 6), temperature=0.0, repetition_penalty=1e4, logprobs=1)
    result = Sampler([EOS])(logits, [seq])
    (token,) = result.token_ids
    assert token not in (5, 6, 7)
    entry = result.logprobs[0]
    assert set(entry) == {5, token}
    total = math.log(math.exp(4) + math.exp(3) + math.exp(-3) + (VOCAB - 3) * math.e)
    assert entry[5] == pytest.approx(4 - total, abs=1e-5)
    assert entry[token] == pytest.approx(1 - total, abs=1e-5)


# SamplingParams validation


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(prompt_logprobs=True), "prompt_logprobs"),
    (dict(n=0), "n"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop=""), "stop"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed=1.5), "seed"),
    (dict(n=True), "n"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


def test_valid_sampling_params_are_normalized():
    params = SamplingParams(top_k=-1, stop="END", temperature=0, max_tokens=None, logprobs=20)
    assert params.top_k == 0
    assert params.stop == ["END"]
    assert params.greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert SamplingParams(max_tokens=3, min_tokens=3).min_tokens == 3


# logit_bias


def test_logit_bias_of_minus_100_bans_the_top_token_and_plus_100_forces_one():
    logits = random_logits(2)
    top = logits.argmax(dim=-1).tolist()
    banned = Sampler([EOS])(logits, [make_seq(temperature=0.0, logit_bias={top[0]: -100}),
                                     make_seq(temperature=0.0, logit_bias={7: 100})])
    assert banned.token_ids[0] != top[0]
    assert banned.token_ids[0] == logits[0].topk(2).indices[1].item()  # the runner-up
    assert banned.token_ids[1] == 7
    forced = draw(logits[0], 200, temperature=1.0, seed=1, logit_bias={11: 100})
    assert set(forced.tolist()) == {11}


def test_logit_bias_leaves_the_reported_logprobs_the_models_own():
    logits = random_logits(1)
    result = Sampler([EOS])(logits, [make_seq(temperature=0.0, logprobs=0, logit_bias={3: 100})])
    assert result.token_ids == [3]
    assert result.logprobs[0][3] == pytest.approx(logits[0].log_softmax(-1)[3].item(), abs=1e-5)


@pytest.mark.parametrize("bias, message", [
    ({-1: 1.0}, "non-negative token ids"), ({"3": 1.0}, "non-negative token ids"),
    ({3: 100.5}, r"\[-100, 100\]"), ({3: float("nan")}, r"\[-100, 100\]"),
    ([3], "must be a dict"), ({i: 1.0 for i in range(1025)}, "at most 1024"),
])
def test_bad_logit_bias_is_a_value_error_naming_it(bias, message):
    with pytest.raises(ValueError, match=f"logit_bias.*{message}"):
        SamplingParams(logit_bias=bias)
