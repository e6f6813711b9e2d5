"""Choosing the next token: greedy at temperature 0, else temperature and nucleus (top-p)
sampling from a per-request generator, seeded when the request has a ``seed``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from batchd.localmodel.gguf_loader import F32

# The nucleus is looked for among this many most likely tokens first; a full sort of the
# vocabulary happens only when they do not reach ``top_p`` together.
_NUCLEUS_CANDIDATES = 256


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Sampler:
    """One request's sampling state (its random generator)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def sample(self, logits: F32) -> int:
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
    """The next token of each row; greedy rows share one vectorised argmax."""
    choices = np.argmax(logits, axis=1)
    out = [int(c) for c in choices]
    for row, sampler in enumerate(samplers):
        if not sampler.params.greedy:
            out[row] = sampler.sample(logits[row])
    return out
