"""The Llama transformer (SmolLM2-135M) in numpy, over a batched KV cache.

One :meth:`Llama.forward` call advances many sequences at once: each contributes a run of
tokens (a whole prompt when it is admitted, one token a step while it generates). All rows of
the step go through the same float32 matmuls, so the weights are read once per step whatever
the batch size; only attention is per sequence, and for the one-token rows it is one batched
matmul over the cache with a length mask.

Conventions checked against ``transformers`` (``tests/unit/test_localmodel_llama.py``):

- llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that its RoPE rotates
  adjacent pairs; the permutation is undone at load and RoPE rotates the two halves of each
  head, as in Hugging Face's ``rotate_half``.
- grouped-query attention: query head ``h`` reads key/value head ``h // (n_heads / n_kv)``.
- the output head is the token embedding matrix (tied).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from batchd.localmodel.gguf_loader import F32, GGUFModel

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> LlamaConfig:
        arch = md.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"GGUF architecture {arch!r} is not llama")
        return cls(
            n_layers=int(md["llama.block_count"]),
            dim=int(md["llama.embedding_length"]),
            n_heads=int(md["llama.attention.head_count"]),
            n_kv_heads=int(md["llama.attention.head_count_kv"]),
            ffn_dim=int(md["llama.feed_forward_length"]),
            vocab_size=int(md.get("llama.vocab_size", len(md["tokenizer.ggml.tokens"]))),
            context_length=int(md["llama.context_length"]),
            rope_theta=float(md.get("llama.rope.freq_base", 10000.0)),
            norm_eps=float(md["llama.attention.layer_norm_rms_epsilon"]),
        )


def unpermute_rows(w: F32, n_heads: int) -> F32:
    """Undo llama.cpp's Q/K row permutation (adjacent-pair RoPE -> half-split RoPE)."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return np.ascontiguousarray(
        w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    )


@dataclass(frozen=True, slots=True)
class _Layer:
    attn_norm: F32
    wqkv: F32  # (dim, q + k + v), transposed for x @ w
    wo: F32  # (dim, dim)
    ffn_norm: F32
    wgate_up: F32  # (dim, 2 * ffn)
    wdown: F32  # (ffn, dim)


class KVCache:
    """Keys and values of every slot: per layer ``(slots, n_kv, capacity, head_dim)``.

    The capacity (positions) grows by doubling when a sequence needs it, up to
    ``max_positions``, and :meth:`reset` gives the memory back when no sequence is active."""

    def __init__(self, cfg: LlamaConfig, slots: int, max_positions: int, initial: int = 64):
        self.cfg = cfg
        self.slots = slots
        self.max_positions = max_positions
        self._initial = min(initial, max_positions)
        self.capacity = 0
        self.k: list[F32] = []
        self.v: list[F32] = []
        self.reset()

    def _alloc(self, capacity: int) -> F32:
        shape = (self.slots, self.cfg.n_kv_heads, capacity, self.cfg.head_dim)
        return np.zeros(shape, dtype=np.float32)

    def reset(self) -> None:
        self.capacity = self._initial
        self.k = [self._alloc(self.capacity) for _ in range(self.cfg.n_layers)]
        self.v = [self._alloc(self.capacity) for _ in range(self.cfg.n_layers)]

    def ensure(self, positions: int) -> None:
        if positions > self.max_positions:
            raise ValueError(f"{positions} positions exceed the cache's {self.max_positions}")
        if positions <= self.capacity:
            return
        capacity = self.capacity
        while capacity < positions:
            capacity *= 2
        capacity = min(capacity, self.max_positions)
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = self._alloc(capacity)
                new[:, :, : self.capacity] = old
                store[i] = new
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def read(self, slot: int, positions: int) -> tuple[list[F32], list[F32]]:
        """A copy of a slot's keys and values at positions ``0..positions-1``, per layer."""
        return (
            [k[slot, :, :positions].copy() for k in self.k],
            [v[slot, :, :positions].copy() for v in self.v],
        )

    def write(self, slot: int, keys: Sequence[F32], values: Sequence[F32]) -> None:
        """Put keys and values from :meth:`read` at the start of ``slot``."""
        positions = keys[0].shape[1]
        self.ensure(positions)
        for store, parts in ((self.k, keys), (self.v, values)):
            for layer, part in zip(store, parts, strict=True):
                layer[slot, :, :positions] = part


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """One sequence's part of a step: ``tokens`` at positions ``start..start+len-1``."""

    slot: int
    tokens: Sequence[int]
    start: int


def _rms_norm(x: F32, weight: F32, eps: float) -> F32:
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    out: F32 = (x * scale * weight).astype(np.float32, copy=False)
    return out


def _softmax_inplace(scores: F32) -> F32:
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


class Llama:
    """The transformer's weights (float32) and its batched forward pass."""

    def __init__(self, cfg: LlamaConfig, tensors: Mapping[str, F32]) -> None:
        self.cfg = cfg
        self.embed = np.ascontiguousarray(tensors["token_embd.weight"], dtype=np.float32)
        output = tensors.get("output.weight")
        self.head_t = self.embed.T if output is None else np.ascontiguousarray(output.T)
        self.out_norm = tensors["output_norm.weight"]
        self.layers: list[_Layer] = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            wq = unpermute_rows(tensors[p + "attn_q.weight"], cfg.n_heads)
            wk = unpermute_rows(tensors[p + "attn_k.weight"], cfg.n_kv_heads)
            wv = tensors[p + "attn_v.weight"]
            gate, up = tensors[p + "ffn_gate.weight"], tensors[p + "ffn_up.weight"]
            self.layers.append(
                _Layer(
                    attn_norm=tensors[p + "attn_norm.weight"],
                    wqkv=np.ascontiguousarray(np.concatenate([wq, wk, wv]).T),
                    wo=np.ascontiguousarray(tensors[p + "attn_output.weight"].T),
                    ffn_norm=tensors[p + "ffn_norm.weight"],
                    wgate_up=np.ascontiguousarray(np.concatenate([gate, up]).T),
                    wdown=np.ascontiguousarray(tensors[p + "ffn_down.weight"].T),
                )
            )
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(half, dtype=np.float64) / half))
        angles = np.outer(np.arange(cfg.context_length, dtype=np.float64), inv_freq)
        self._cos = np.cos(angles).astype(np.float32)
        self._sin = np.sin(angles).astype(np.float32)

    @classmethod
    def from_gguf(cls, model: GGUFModel) -> Llama:
        return cls(LlamaConfig.from_metadata(model.metadata), model.tensors)

    @property
    def nbytes(self) -> int:
        arrays = [self.embed, self._cos, self._sin]
        for layer in self.layers:
            arrays += [layer.wqkv, layer.wo, layer.wgate_up, layer.wdown]
        return sum(a.nbytes for a in arrays)

    def _rope(self, x: F32, positions: I64) -> F32:
        """Rotate ``x`` (rows, heads, head_dim) in place by each row's position."""
        half = self.cfg.head_dim // 2
        cos = self._cos[positions][:, None, :]
        sin = self._sin[positions][:, None, :]
        x1 = x[..., :half].copy()
        x2 = x[..., half:]
        x[..., :half] = x1 * cos - x2 * sin
        x[..., half:] = x2 * cos + x1 * sin
        return x

    def forward(self, cache: KVCache, chunks: Sequence[SeqChunk]) -> F32:
        """Run one step; returns the logits after each chunk's last token, ``(chunks, vocab)``.

        Writes the chunks' keys and values into ``cache`` at their slots and positions."""
        cfg = self.cfg
        lengths = np.array([len(c.tokens) for c in chunks], dtype=np.int64)
        ends = np.cumsum(lengths)
        tokens = np.concatenate([np.asarray(c.tokens, dtype=np.int64) for c in chunks])
        positions = np.concatenate(
            [np.arange(c.start, c.start + len(c.tokens), dtype=np.int64) for c in chunks]
        )
        slots = np.repeat(np.array([c.slot for c in chunks], dtype=np.int64), lengths)
        cache.ensure(int(positions.max()) + 1)
        single = np.flatnonzero(lengths == 1)
        plan = _AttentionPlan.build(
            rows=ends[single] - 1,
            slots=np.array([chunks[int(i)].slot for i in single], dtype=np.int64),
            positions=positions[ends[single] - 1],
            multi=[
                (int(ends[i] - lengths[i]), chunks[int(i)]) for i in np.flatnonzero(lengths > 1)
            ],
        )
        x = self.embed[tokens]
        with np.errstate(over="ignore", under="ignore"):
            for index, layer in enumerate(self.layers):
                x = self._layer(x, layer, cache, index, positions, slots, plan)
            last = _rms_norm(x[ends - 1], self.out_norm, cfg.norm_eps)
            logits: F32 = last @ self.head_t
        return logits

    def _layer(
        self,
        x: F32,
        layer: _Layer,
        cache: KVCache,
        index: int,
        positions: I64,
        slots: I64,
        plan: _AttentionPlan,
    ) -> F32:
        cfg = self.cfg
        n, hd = x.shape[0], cfg.head_dim
        nq, nkv = cfg.n_heads, cfg.n_kv_heads
        h = _rms_norm(x, layer.attn_norm, cfg.norm_eps)
        qkv = h @ layer.wqkv
        qk = self._rope(qkv[:, : (nq + nkv) * hd].reshape(n, nq + nkv, hd), positions)
        q = qk[:, :nq]
        kc, vc = cache.k[index], cache.v[index]
        kc[slots, :, positions, :] = qk[:, nq:]
        vc[slots, :, positions, :] = qkv[:, (nq + nkv) * hd :].reshape(n, nkv, hd)
        attn = np.empty((n, nq, hd), dtype=np.float32)
        self._attend_single(q, kc, vc, plan, attn)
        for offset, chunk in plan.multi:
            self._attend_run(q[offset : offset + len(chunk.tokens)], kc, vc, chunk, attn, offset)
        x = x + attn.reshape(n, nq * hd) @ layer.wo
        h = _rms_norm(x, layer.ffn_norm, cfg.norm_eps)
        gu = h @ layer.wgate_up
        gate, up = gu[:, : cfg.ffn_dim], gu[:, cfg.ffn_dim :]
        act = gate / (1.0 + np.exp(-gate)) * up
        out: F32 = x + act @ layer.wdown
        return out

    def _attend_single(self, q: F32, kc: F32, vc: F32, plan: _AttentionPlan, out: F32) -> None:
        """Attention of one-token rows, batched: each row reads its slot's cache up to its
        position, the other positions masked."""
        if plan.rows.size == 0:
            return
        cfg = self.cfg
        b, hd = plan.rows.size, cfg.head_dim
        group = cfg.n_heads // cfg.n_kv_heads
        length = plan.bias.shape[-1]
        pick: slice | I64 = plan.slots if plan.slot_range is None else plan.slot_range
        keys = kc[pick, :, :length]  # (b, n_kv, L, hd)
        values = vc[pick, :, :length]
        qg = q[plan.rows].reshape(b, cfg.n_kv_heads, group, hd)
        qg *= np.float32(1.0 / np.sqrt(hd))
        scores = qg @ keys.transpose(0, 1, 3, 2)  # (b, n_kv, group, L)
        scores += plan.bias
        probs = _softmax_inplace(scores)
        out[plan.rows] = (probs @ values).reshape(b, cfg.n_heads, hd)

    def _attend_run(self, q: F32, kc: F32, vc: F32, chunk: SeqChunk, out: F32, offset: int) -> None:
        """Causal attention of a run of tokens (a prompt) over its slot's cache."""
        cfg = self.cfg
        t, hd = q.shape[0], cfg.head_dim
        group = cfg.n_heads // cfg.n_kv_heads
        total = chunk.start + t
        keys = kc[chunk.slot, :, :total]  # (n_kv, S, hd)
        values = vc[chunk.slot, :, :total]
        qg = q.reshape(t, cfg.n_kv_heads, group, hd).transpose(1, 2, 0, 3)  # (n_kv, g, t, hd)
        scores = qg @ keys[:, None].transpose(0, 1, 3, 2)  # (n_kv, g, t, S)
        scores *= np.float32(1.0 / np.sqrt(hd))
        future = np.arange(total)[None, :] > (chunk.start + np.arange(t))[:, None]
        scores[:, :, future] = -np.inf
        probs = _softmax_inplace(scores)
        ctx = probs @ values[:, None]  # (n_kv, g, t, hd)
        out[offset : offset + t] = ctx.transpose(2, 0, 1, 3).reshape(t, cfg.n_heads, hd)


@dataclass(frozen=True, slots=True)
class _AttentionPlan:
    """What every layer's attention needs to know about a step, computed once a step."""

    rows: I64  # rows of one-token chunks
    slots: I64  # their slots
    slot_range: slice | None  # the same slots as a slice when consecutive (a view, no copy)
    bias: F32  # (rows, 1, 1, L): 0 where a row may attend, -inf past its position
    multi: list[tuple[int, SeqChunk]]  # (first row, chunk) of multi-token chunks

    @classmethod
    def build(
        cls, rows: I64, slots: I64, positions: I64, multi: list[tuple[int, SeqChunk]]
    ) -> _AttentionPlan:
        length = int(positions.max()) + 1 if positions.size else 0
        bias = np.where(np.arange(length)[None, :] > positions[:, None], -np.inf, 0.0)
        consecutive = slots.size > 0 and bool(np.all(np.diff(slots) == 1))
        return cls(
            rows=rows,
            slots=slots,
            slot_range=slice(int(slots[0]), int(slots[-1]) + 1) if consecutive else None,
            bias=bias.astype(np.float32)[:, None, None, :],
            multi=multi,
        )
