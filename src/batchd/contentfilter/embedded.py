"""The embedded classifier: Azure's four categories from MiniLM sentence embeddings.

Per category, three logistic heads over the 384-dimension all-MiniLM-L6-v2 embedding give the
calibrated probabilities that a text is at least of low, medium and high severity (an
ordinal model: ``P(severity >= k)``). They are made monotone (a higher level is never more
likely than a lower one) and the severity is the highest level whose probability is at least
one half. The heads (``heads.npz``, a few tens of KB) are trained and calibrated by
``scripts/content_filter/train.py`` on the labelled set the repository carries; its measured
precision and recall are in ``docs/content-filter.md``. At run time only numpy is needed.

A text is cut into chunks of whole sentences of at most :data:`CHUNK_CHARS` characters (the
heads were trained on short texts; a harmful sentence is not diluted by a long, harmless
text around it) and takes the worst severity of its chunks. The chunks of every concurrent
call are embedded together on the MiniLM worker thread
(:class:`batchd.localmodel.minilm.EmbeddingWorker`), in length-sorted batches. The last
:data:`CACHE_CHUNKS` chunks judged are remembered: a system prompt that every line of a batch
repeats is embedded once. MiniLM costs ~21 MFLOP a token, ~7 ms of one core for a
30-token text in a batch of 32 (see docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batchd.contentfilter.severity import CATEGORIES, Assessment
from batchd.localmodel.minilm import EmbeddingInput, EmbeddingJob, EmbeddingWorker, MiniLM
from batchd.localmodel.packages import MINILM, package_dir
from batchd.localmodel.worker import limit_blas_threads, run_job

HEADS_FILE = Path(__file__).with_name("heads.npz")
EMBEDDING_DIM = 384
LEVELS = 3  # P(>= low), P(>= medium), P(>= high)
CHUNK_CHARS = 300
CACHE_CHUNKS = 4096
DEFAULT_TIME_LIMIT = 300.0

F32 = npt.NDArray[np.float32]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


class Heads:
    """The trained heads: ``weights`` (384, 4 * 3) and ``bias`` (4 * 3,), float32, in
    :data:`CATEGORIES` order, levels low/medium/high within a category."""

    def __init__(self, weights: F32, bias: F32) -> None:
        if weights.shape != (EMBEDDING_DIM, len(CATEGORIES) * LEVELS) or bias.shape != (
            len(CATEGORIES) * LEVELS,
        ):
            raise ValueError(f"heads of shape {weights.shape} / {bias.shape}")
        self.weights = weights.astype(np.float32)
        self.bias = bias.astype(np.float32)

    @staticmethod
    def load(path: Path = HEADS_FILE) -> Heads:
        """Read ``heads.npz`` (arrays ``weights``, ``bias`` and ``categories``, which must
        be :data:`CATEGORIES`). Raises ValueError for a file of another shape."""
        with np.load(path, allow_pickle=False) as data:
            categories = tuple(str(c) for c in data["categories"])
            if categories != CATEGORIES:
                raise ValueError(f"{path}: heads for {categories}, expected {CATEGORIES}")
            return Heads(data["weights"], data["bias"])

    def probabilities(self, vectors: F32) -> F32:
        """``(n, 4, 3)``: per text and category, P(severity >= low, medium, high), monotone."""
        logits = vectors.astype(np.float32) @ self.weights + self.bias
        with np.errstate(over="ignore"):
            p = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        p = p.reshape(len(vectors), len(CATEGORIES), LEVELS)
        out: F32 = np.minimum.accumulate(p, axis=2)
        return out

    def assess(self, vectors: F32) -> list[Assessment]:
        return [assessment(p) for p in self.probabilities(vectors)]


def assessment(p: F32) -> Assessment:
    """One text's :class:`Assessment` from its ``(4, 3)`` monotone probabilities: severity =
    the number of levels with probability >= 0.5; score = P(severity >= medium)."""
    sev = (p >= 0.5).sum(axis=1)
    return Assessment.of([int(s) for s in sev], [float(v) for v in p[:, 1]])


def chunks(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """``text`` as runs of whole sentences of at most ``limit`` characters (a longer
    sentence is cut at spaces, or anywhere when it has none); no chunk for blank text."""
    out: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        while len(sentence) > limit:
            if current:
                out.append(current)
                current = ""
            cut = sentence.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            out.append(sentence[:cut])
            sentence = sentence[cut:].strip()
        if not sentence:
            continue
        if current and len(current) + 1 + len(sentence) > limit:
            out.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        out.append(current)
    return out


class EmbeddedClassifier:
    """The four categories of any number of texts, on the CPU, offline.

    MiniLM is loaded on the first call, on the classifier's own thread; a missing weights
    package raises :class:`batchd.backends.base.BackendUnavailable` naming the install
    command (see :meth:`require_weights`)."""

    def __init__(self, heads: Heads | None = None, *, blas_threads: int | None = 1) -> None:
        self.heads = heads if heads is not None else Heads.load()
        self.blas_threads = blas_threads
        self._worker: EmbeddingWorker | None = None
        self._cache: OrderedDict[str, Assessment] = OrderedDict()

    @staticmethod
    def require_weights() -> Path:
        """The MiniLM weights' directory; BackendUnavailable when not installed."""
        return package_dir(MINILM) / "model"

    def _embedder(self) -> EmbeddingWorker:
        if self._worker is None:
            path = self.require_weights()

            def load() -> MiniLM:
                limit_blas_threads(self.blas_threads)
                return MiniLM(path)

            self._worker = EmbeddingWorker(load)
        return self._worker

    async def classify(
        self,
        texts: Sequence[str],
        *,
        replying_to: str | None = None,
        time_limit: float = DEFAULT_TIME_LIMIT,
    ) -> list[Assessment]:
        """One :class:`Assessment` a text (``replying_to``, the prompt an answer replies to,
        is not used: each text is judged on its own)."""
        pieces = [chunks(t) for t in texts]
        cache = self._cache
        wanted = dict.fromkeys(c for p in pieces for c in p)
        known = {c: cache[c] for c in wanted if c in cache}
        todo = [c for c in wanted if c not in known]
        if todo:
            known.update(zip(todo, await self._judge(todo, time_limit), strict=True))
        for chunk, found in known.items():
            cache[chunk] = found
            cache.move_to_end(chunk)
        while len(cache) > CACHE_CHUNKS:
            cache.popitem(last=False)
        return [Assessment.worst(known[c] for c in p) for p in pieces]

    async def _judge(self, texts: list[str], time_limit: float) -> list[Assessment]:
        worker = self._embedder()
        inputs: list[EmbeddingInput] = list(texts)

        def submit(deliver: Callable[[Any], None]) -> EmbeddingJob:
            job = EmbeddingJob(inputs=inputs, on_done=deliver)
            worker.submit(job)
            return job

        vectors, _ = await run_job(submit, time_limit)
        return self.heads.assess(vectors)

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.to_thread(worker.close)
