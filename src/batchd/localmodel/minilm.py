"""all-MiniLM-L6-v2 sentence embeddings in numpy, as sentence-transformers computes them.

BERT (6 layers, 384 dims, 12 heads, GELU), then mean pooling over the attention mask and L2
normalisation (the model's ``modules.json``: Transformer -> Pooling(mean) -> Normalize).
Inputs are truncated to 256 tokens like sentence-transformers' ``max_seq_length``.
Concurrent requests are gathered by :class:`EmbeddingWorker` into length-sorted batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from batchd.localmodel.gguf_loader import F32
from batchd.localmodel.worker import ModelWorker

MAX_TOKENS = 256
_BATCH = 32  # sequences a forward pass
_EPS = 1e-12


_GELU_ROWS = 32  # rows of the GELU computed at once, so its passes stay in the cache


def _gelu(x: F32) -> F32:
    """Exact (erf) GELU, in place, with numpy only: erf by Abramowitz & Stegun 7.1.26
    (|error| < 1.5e-7). It takes ~15 passes over its input, so it runs a few rows at a time
    (each slice stays in the L2 cache) with two scratch buffers."""
    rows = min(_GELU_ROWS, x.shape[0])
    z_buf = np.empty((rows, x.shape[1]), dtype=np.float32)
    t_buf = np.empty_like(z_buf)
    for start in range(0, x.shape[0], rows):
        part = x[start : start + rows]
        n = part.shape[0]
        z, t = z_buf[:n], t_buf[:n]
        np.abs(part, out=z)
        z *= np.float32(1.0 / np.sqrt(2.0))
        np.multiply(z, np.float32(0.3275911), out=t)
        t += 1.0
        np.reciprocal(t, out=t)
        poly = t * np.float32(1.061405429)
        for coefficient in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
            poly += np.float32(coefficient)
            poly *= t
        np.square(z, out=z)
        np.negative(z, out=z)
        np.exp(z, out=z)
        poly *= z  # 1 - erf(|x| / sqrt 2)
        # gelu = x/2 * (1 + erf(x / sqrt 2)); for x < 0, erf is -erf(|x|)
        np.subtract(1.0, poly, out=poly)
        np.copysign(poly, part, out=poly)
        poly += 1.0
        poly *= np.float32(0.5)
        part *= poly
    return x


def _layer_norm(x: F32, weight: F32, bias: F32) -> F32:
    """Layer norm over the last axis, in place."""
    x -= x.mean(axis=-1, keepdims=True)
    var = np.einsum("ij,ij->i", x, x)[:, None]
    var *= np.float32(1.0 / x.shape[-1])
    var += np.float32(_EPS)
    np.sqrt(var, out=var)
    x /= var
    x *= weight
    x += bias
    return x


@dataclass(frozen=True, slots=True)
class _BertLayer:
    wqkv: F32  # (384, 3 * 384)
    bqkv: F32
    wo: F32
    bo: F32
    ln1: tuple[F32, F32]
    wi: F32
    bi: F32
    wout: F32
    bout: F32
    ln2: tuple[F32, F32]


def _special_id(tok: Tokenizer, token: str) -> int:
    found = tok.token_to_id(token)
    if found is None:
        raise ValueError(f"the MiniLM tokenizer has no {token} token")
    return int(found)


class MiniLM:
    """The embedder: tokenizer plus BERT weights (float32, transposed for ``x @ w``)."""

    heads = 12

    def __init__(self, model_dir: Path) -> None:
        w = load_file(str(model_dir / "model.safetensors"))
        w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in w.items()}
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"][0]
        self.emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.dim = int(self.word.shape[1])
        self.layers: list[_BertLayer] = []
        # 1/sqrt(head dim) on the query columns only
        scale = np.ones(3 * self.dim, dtype=np.float32)
        scale[: self.dim] = np.float32(1.0 / np.sqrt(self.dim // self.heads))
        i = 0
        while f"encoder.layer.{i}.attention.self.query.weight" in w:
            p = f"encoder.layer.{i}."
            a = p + "attention."
            names = ("query", "key", "value")
            self.layers.append(
                _BertLayer(
                    wqkv=np.ascontiguousarray(
                        np.concatenate([w[f"{a}self.{n}.weight"] for n in names]).T * scale
                    ),
                    bqkv=np.concatenate([w[f"{a}self.{n}.bias"] for n in names]) * scale,
                    wo=np.ascontiguousarray(w[a + "output.dense.weight"].T),
                    bo=w[a + "output.dense.bias"],
                    ln1=(w[a + "output.LayerNorm.weight"], w[a + "output.LayerNorm.bias"]),
                    wi=np.ascontiguousarray(w[p + "intermediate.dense.weight"].T),
                    bi=w[p + "intermediate.dense.bias"],
                    wout=np.ascontiguousarray(w[p + "output.dense.weight"].T),
                    bout=w[p + "output.dense.bias"],
                    ln2=(w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
                )
            )
            i += 1
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(MAX_TOKENS)
        self.tokenizer = tok
        self.vocab_size = int(self.word.shape[0])
        self.cls_id = _special_id(tok, "[CLS]")
        self.sep_id = _special_id(tok, "[SEP]")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids with [CLS] and [SEP], truncated to 256."""
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def wrap_ids(self, ids: Sequence[int]) -> list[int]:
        """Caller-given token ids with [CLS]/[SEP] added, truncated to 256."""
        return [self.cls_id, *ids[: MAX_TOKENS - 2], self.sep_id]

    def embed(self, batch: Sequence[Sequence[int]]) -> F32:
        """Normalised embeddings of token id lists, ``(len(batch), 384)``."""
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        for start in range(0, len(order), _BATCH):
            rows = order[start : start + _BATCH]
            out[rows] = self._forward([batch[i] for i in rows])
        return out

    def _forward(self, seqs: Sequence[Sequence[int]]) -> F32:
        b, length = len(seqs), max(len(s) for s in seqs)
        ids = np.zeros((b, length), dtype=np.int64)
        mask = np.zeros((b, length), dtype=np.float32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1.0
        # Activations stay 2-D, (b * length, 384), so each weight is one GEMM for the batch.
        x = self.word[ids] + self.position[:length] + self.token_type
        x = _layer_norm(x.reshape(b * length, self.dim), *self.emb_ln)
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]  # (b, 1, 1, L)
        with np.errstate(over="ignore", under="ignore"):
            for layer in self.layers:
                x = self._layer(x, layer, bias, b, length)
        summed = (x.reshape(b, length, self.dim) * mask[:, :, None]).sum(axis=1)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        result: F32 = (pooled / norms).astype(np.float32)
        return result

    def _layer(self, x: F32, layer: _BertLayer, bias: F32, b: int, length: int) -> F32:
        dim = self.dim
        hd = dim // self.heads
        qkv = x @ layer.wqkv
        qkv += layer.bqkv
        # (3, b, heads, L, hd); the 1/sqrt(hd) of the scores is folded into the query weights
        q, k, v = qkv.reshape(b, length, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
        scores = q @ k.transpose(0, 1, 3, 2)
        scores += bias
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(b * length, dim)
        attended = ctx @ layer.wo
        attended += layer.bo
        attended += x
        x = _layer_norm(attended, *layer.ln1)
        inner = x @ layer.wi
        inner += layer.bi
        out = _gelu(inner) @ layer.wout
        out += layer.bout
        out += x
        return _layer_norm(out, *layer.ln2)


EmbeddingInput = str | list[int]


@dataclass(eq=False, slots=True)
class EmbeddingJob:
    """Inputs of one request; ``on_done`` gets ``(vectors, token counts)`` or the exception,
    on the worker's thread."""

    inputs: list[EmbeddingInput]
    on_done: Callable[[tuple[F32, list[int]] | BaseException], None]
    cancelled: bool = False


class EmbeddingWorker(ModelWorker[MiniLM, EmbeddingJob]):
    """Embeds every job waiting at a step in one length-sorted pass."""

    def __init__(self, load: Callable[[], MiniLM], *, max_inputs: int = 512) -> None:
        super().__init__("batchd-local-embeddings", load)
        self.max_inputs = max_inputs
        self._jobs: list[EmbeddingJob] = []

    def _busy(self) -> bool:
        return bool(self._jobs)

    def _accept(self, jobs: list[EmbeddingJob]) -> None:
        self._jobs.extend(jobs)

    def _fail(self, job: EmbeddingJob, exc: BaseException) -> None:
        job.on_done(exc)

    def _abort(self, exc: BaseException) -> None:
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.on_done(exc)

    def _step(self, model: MiniLM) -> None:
        taken: list[EmbeddingJob] = []
        count = 0
        while self._jobs and (not taken or count + len(self._jobs[0].inputs) <= self.max_inputs):
            job = self._jobs.pop(0)
            if not job.cancelled:
                taken.append(job)
                count += len(job.inputs)
        if not taken:
            return
        ids: list[list[int]] = []
        for job in taken:
            texts = [x for x in job.inputs if isinstance(x, str)]
            encoded = iter(model.tokenize(texts))
            ids += [next(encoded) if isinstance(x, str) else model.wrap_ids(x) for x in job.inputs]
        vectors = model.embed(ids)
        start = 0
        for job in taken:
            n = len(job.inputs)
            tokens = [len(i) - 2 for i in ids[start : start + n]]
            job.on_done((vectors[start : start + n], tokens))
            start += n


def cosine(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
