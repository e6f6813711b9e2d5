"""Sampling: greedy, seeded determinism, temperature and top-p (no weights needed)."""

from __future__ import annotations

import numpy as np
import pytest

from batchd.localmodel.sampling import Sampler, SamplingParams, sample_rows, token_logprob


def _logits(seed: int = 0, vocab: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, vocab).astype(np.float32)


def test_temperature_zero_is_argmax() -> None:
    logits = _logits()
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    logits = _logits()
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    a, b = Sampler(params), Sampler(params)
    first = [a.sample(logits) for _ in range(50)]
    assert first == [b.sample(logits) for _ in range(50)]
    other = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=43))
    assert first != [other.sample(logits) for _ in range(50)]


def test_tiny_top_p_keeps_only_the_best_token() -> None:
    logits = _logits()
    sampler = Sampler(SamplingParams(temperature=1.5, top_p=1e-6, seed=1))
    assert {sampler.sample(logits) for _ in range(20)} == {int(np.argmax(logits))}


def test_top_p_never_picks_outside_the_nucleus() -> None:
    logits = _logits(vocab=5000)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1].tolist())
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=7))
    assert {sampler.sample(logits) for _ in range(300)} <= nucleus


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    counts = np.bincount([sampler.sample(logits) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


def test_sample_rows_mixes_greedy_and_sampled_rows() -> None:
    logits = np.stack([_logits(1), _logits(2)])
    rows = sample_rows(
        logits, [Sampler(SamplingParams(temperature=0)), Sampler(SamplingParams(seed=5))]
    )
    assert rows[0] == int(np.argmax(logits[0]))
    assert rows[1] == Sampler(SamplingParams(seed=5)).sample(logits[1])


def test_logit_bias_and_penalties_adjust_the_logits() -> None:
    logits = np.array([1.0, 3.0, 2.0, 0.5], dtype=np.float32)
    biased = Sampler(SamplingParams(temperature=0, logit_bias=((3, 10.0),)))
    assert biased.choose(logits) == 3
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=0.6, presence_penalty=0.5))
    assert sample_rows(logits[None, :], [sampler]) == [1]  # nothing generated yet
    # token 1 once: 3.0 - 0.6 - 0.5 = 1.9 < 2.0
    assert sample_rows(logits[None, :], [sampler]) == [2]
    np.testing.assert_allclose(sampler.adjusted(logits), [1.0, 1.9, 0.9, 0.5], rtol=1e-6)
    assert logits.tolist() == [1.0, 3.0, 2.0, 0.5]  # the model's logits are left as they were


def test_token_logprob_is_a_log_softmax() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    token, logprob, top = token_logprob(logits, 1, 2)
    expected = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    assert token == 1 and logprob == pytest.approx(expected[1])
    assert [t for t, _ in top] == [0, 1]
    assert [lp for _, lp in top] == pytest.approx([expected[0], expected[1]])
    assert token_logprob(logits, 3, 0)[2] == ()
