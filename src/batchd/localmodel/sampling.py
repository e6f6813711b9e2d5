"""Choosing the next token: greedy at temperature 0, else temperature and nucleus (top-p)
sampling from a per-request generator, seeded when the request has a ``seed``; before either,
``logit_bias`` and the presence and frequency penalties adjust the logits as OpenAI
documents them. Log probabilities are the model's own (before any adjustment)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from batchd.localmodel.gguf_loader import F32

# The nucleus is looked for among this many most likely tokens first; a full sort of the
# vocabulary happens only when they do not reach ``top_p`` together.
_NUCLEUS_CANDIDATES = 256


# A generated token's log probability: (token id, log probability, the ``top`` most likely
# tokens at that step with theirs, most likely first).
TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """The sampling a model is meant to run with: what a request that leaves ``temperature``
    or ``top_p`` unset gets, each on its own (vLLM applies a model's ``generation_config``
    the same way: request values win, the model's fill only what is unset)."""

    temperature: float = 1.0
    top_p: float = 1.0


# OpenAI's documented defaults (temperature 1, top_p 1): for a model that states none.
OPENAI_DEFAULTS = SamplingDefaults()


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), added to the logits
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def adjusts(self) -> bool:
        return bool(self.logit_bias) or self.penalised


class Sampler:
    """One request's sampling state (its random generator)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._bias_ids = np.array([i for i, _ in params.logit_bias], dtype=np.intp)
        self._bias = np.array([b for _, b in params.logit_bias], dtype=np.float32)
        self._counts: dict[int, int] = {}  # generated tokens, for the penalties

    def choose(self, logits: F32) -> int:
        """The next token from this step's logits (one row)."""
        return self.sample(self.adjusted(logits) if self.params.adjusts else logits)

    def observe(self, token: int) -> None:
        """Record a generated token (the penalties count them)."""
        if self.params.penalised:
            self._counts[token] = self._counts.get(token, 0) + 1

    def adjusted(self, logits: F32) -> F32:
        """A copy of ``logits`` with the bias added and, for each token generated so far ``c``
        times, ``c * frequency_penalty + presence_penalty`` taken off."""
        p = self.params
        out = np.array(logits, dtype=np.float32)
        if self._bias_ids.size:
            out[self._bias_ids] += self._bias
        if self._counts:
            n = len(self._counts)
            ids = np.fromiter(self._counts.keys(), dtype=np.intp, count=n)
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=n)
            out[ids] -= counts * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty)
        return out

    def sample(self, logits: F32) -> int:
        """The most likely token at temperature 0, else temperature and top-p sampling."""
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        scaled -= scaled.max()
        probs = np.exp(scaled)
        probs /= probs.sum()
        if p.top_p < 1.0:
            candidates = _nucleus(probs, p.top_p)
            weights = probs[candidates]
        else:
            candidates, weights = None, probs
        cumulative = np.cumsum(weights)
        pick = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        pick = min(pick, cumulative.size - 1)
        return pick if candidates is None else int(candidates[pick])


def _nucleus(probs: npt.NDArray[np.float64], top_p: float) -> npt.NDArray[np.intp]:
    """Ids of the smallest set of most likely tokens whose probabilities sum to ``top_p``,
    most likely first."""
    k = min(_NUCLEUS_CANDIDATES, probs.size)
    top = np.argpartition(-probs, k - 1)[:k]
    top = top[np.argsort(-probs[top], kind="stable")]
    cumulative = np.cumsum(probs[top])
    if cumulative[-1] < top_p:
        top = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[top])
    cut = int(np.searchsorted(cumulative, top_p)) + 1
    return top[: max(1, min(cut, top.size))]


def sample_rows(logits: F32, samplers: Sequence[Sampler]) -> list[int]:
    """The next token of each row; plain greedy rows share one vectorised argmax."""
    choices = np.argmax(logits, axis=1)
    out = [int(c) for c in choices]
    for row, sampler in enumerate(samplers):
        p = sampler.params
        if not p.greedy or p.adjusts:
            out[row] = sampler.choose(logits[row])
        sampler.observe(out[row])
    return out


def token_logprob(logits: F32, token: int, top: int) -> TokenLogprob:
    """The log probability of ``token`` under this step's logits (the model's distribution,
    before any bias, penalty or temperature) and the ``top`` most likely tokens'."""
    row = logits.astype(np.float64)
    row -= row.max()
    row -= np.log(np.exp(row).sum())
    alternatives: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, row.size)
        best = np.argpartition(-row, k - 1)[:k]
        best = best[np.argsort(-row[best], kind="stable")]
        alternatives = tuple((int(i), float(row[i])) for i in best)
    return token, float(row[token]), alternatives
