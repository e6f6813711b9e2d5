"""Continuous batching of text generations on the model's thread.

Every step runs one :meth:`Llama.forward` over all active sequences (one token each) plus
the prompts of the sequences admitted at that step. A sequence leaves as soon as it stops
(end-of-turn token, stop string, ``max_tokens``, context full) and its slot is given to the
next waiting job at the following step, so a long answer never holds a short one back.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from batchd.localmodel.gguf_loader import F32, load_gguf
from batchd.localmodel.llama import KVCache, Llama, SeqChunk
from batchd.localmodel.requests import BadRequest
from batchd.localmodel.sampling import (
    Sampler,
    SamplingParams,
    TokenLogprob,
    sample_rows,
    token_logprob,
)
from batchd.localmodel.tokenizer import BpeTokenizer
from batchd.localmodel.worker import ModelWorker


@dataclass(frozen=True, slots=True)
class LoadedLlm:
    model: Llama
    tokenizer: BpeTokenizer
    chat_template: str | None


def load_llm(path: Path) -> LoadedLlm:
    gguf = load_gguf(path)
    template = gguf.metadata.get("tokenizer.chat_template")
    return LoadedLlm(
        model=Llama.from_gguf(gguf),
        tokenizer=BpeTokenizer(gguf.metadata),
        chat_template=template if isinstance(template, str) else None,
    )


# (token bytes, log probability, ((bytes, log probability) of the most likely tokens, ...))
ByteLogprob = tuple[bytes, float, tuple[tuple[bytes, float], ...]]


class PromptTooLong(ValueError):
    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(
            f"this model's context is {limit} tokens; the prompt has {tokens} tokens, "
            "leaving no room for the completion"
        )
        self.tokens = tokens
        self.limit = limit


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    # When asked for: per token of ``text``, its bytes and log probability, and the most
    # likely tokens' (see :func:`batchd.localmodel.sampling.token_logprob`).
    logprobs: tuple[ByteLogprob, ...] | None = None
    stop_sequence: str | None = None  # the stop string that ended ``text``, if one did

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(eq=False, slots=True)
class GenerationJob:
    """One completion to generate. ``build_prompt`` runs on the model thread (it needs the
    tokenizer); ``on_done`` is called there too, with the result or the exception."""

    build_prompt: Callable[[LoadedLlm], list[int]]
    on_done: Callable[[GenerationResult | BaseException], None]
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: not asked for; else alternatives a token
    cancelled: bool = False  # set by the caller (any thread) when it stops waiting


@dataclass(eq=False, slots=True)
class _Sequence:
    job: GenerationJob
    slot: int
    prompt_tokens: int
    limit: int  # most tokens to generate
    sampler: Sampler
    pending: list[int]  # tokens to feed at the next step
    position: int = 0  # position of pending[0]
    generated: list[int] = field(default_factory=list)
    stop_text: str | None = None  # the text cut at a stop string, once one is seen
    stop_sequence: str | None = None  # that stop string
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the job asks
    save_prefix: tuple[int, ...] | None = None  # keep this prompt prefix's keys/values


_PrefixKV = tuple[list[F32], list[F32]]


class GenerationScheduler(ModelWorker[LoadedLlm, GenerationJob]):
    """Runs :class:`GenerationJob` s with up to ``max_batch`` sequences in flight."""

    def __init__(
        self,
        load: Callable[[], LoadedLlm],
        *,
        max_batch: int = 32,
        max_positions: int = 2048,
        prefill_budget: int = 2048,
    ) -> None:
        super().__init__("batchd-local-llm", load)
        self.max_batch = max_batch
        self.max_positions = max_positions
        self.prefill_budget = prefill_budget
        self._waiting: deque[GenerationJob] = deque()
        self._active: dict[int, _Sequence] = {}
        self._cache: KVCache | None = None
        self._prefixes: OrderedDict[tuple[int, ...], _PrefixKV] = OrderedDict()
        self.max_prefixes = 16
        self.max_prefix_bytes = 256 * 1024 * 1024
        self.steps = 0
        self.prefix_hits = 0

    def _busy(self) -> bool:
        return bool(self._active or self._waiting)

    def _accept(self, jobs: list[GenerationJob]) -> None:
        self._waiting.extend(jobs)

    def _fail(self, job: GenerationJob, exc: BaseException) -> None:
        job.on_done(exc)

    def _abort(self, exc: BaseException) -> None:
        jobs = [s.job for s in self._active.values()] + list(self._waiting)
        self._active.clear()
        self._waiting.clear()
        if self._cache is not None:
            self._cache.reset()
        for job in jobs:
            job.on_done(exc)

    def _admit(self, llm: LoadedLlm) -> None:
        free = [s for s in range(self.max_batch) if s not in self._active]
        budget = self.prefill_budget
        admitted: list[_Sequence] = []
        while self._waiting and free:
            job = self._waiting.popleft()
            if job.cancelled:
                continue
            try:
                prompt = job.build_prompt(llm) or [llm.tokenizer.eos_id]
                _check_bias(job.sampling, llm.tokenizer.vocab_size)
            except Exception as exc:
                job.on_done(exc)
                continue
            room = self.max_positions - len(prompt)
            if room < 1:
                job.on_done(PromptTooLong(len(prompt), self.max_positions))
                continue
            if len(prompt) > budget and budget < self.prefill_budget:
                self._waiting.appendleft(job)  # next step: this step's prefill is full
                break
            budget -= len(prompt)
            limit = room if job.max_tokens is None else min(job.max_tokens, room)
            seq = _Sequence(
                job=job,
                slot=free.pop(0),
                prompt_tokens=len(prompt),
                limit=limit,
                sampler=Sampler(job.sampling),
                pending=prompt,
            )
            self._reuse_prefix(llm, seq)
            self._active[seq.slot] = seq
            admitted.append(seq)
        self._share_new_prefixes(llm, admitted)

    def _share_new_prefixes(self, llm: LoadedLlm, admitted: list[_Sequence]) -> None:
        """Sequences admitted together that share a prefix not cached yet (a batch's first
        step) compute it once: a forward pass of the prefix alone in the first one's slot,
        copied into the others, instead of once per sequence."""
        groups: dict[tuple[int, ...], list[_Sequence]] = {}
        for seq in admitted:
            if seq.save_prefix is not None:
                groups.setdefault(seq.save_prefix, []).append(seq)
        assert self._cache is not None
        for key, group in groups.items():
            if len(group) < 2:
                continue
            first = group[0]
            llm.model.forward(self._cache, [SeqChunk(first.slot, key, 0)])
            self._prefixes[key] = stored = self._cache.read(first.slot, len(key))
            self._trim_prefixes()
            for seq in group:
                if seq is not first:
                    self._cache.write(seq.slot, *stored)
                    self.prefix_hits += 1
                seq.save_prefix = None
                seq.pending = seq.pending[len(key) :]
                seq.position = len(key)

    def _reuse_prefix(self, llm: LoadedLlm, seq: _Sequence) -> None:
        """Prefix caching: a batch's requests mostly share their system message, whose keys
        and values are computed once and copied into each new sequence's slot.

        The prefix is the prompt up to the end of its first turn (``<|im_end|>`` and the
        newline after it); it is exact to reuse because attention is causal."""
        prompt = seq.pending
        try:
            cut = prompt.index(llm.tokenizer.eos_id) + 2
        except ValueError:
            return
        if cut >= len(prompt) or cut < 8:
            return
        key = tuple(prompt[:cut])
        stored = self._prefixes.get(key)
        if stored is None:
            seq.save_prefix = key
            return
        assert self._cache is not None
        self._prefixes.move_to_end(key)
        self._cache.write(seq.slot, *stored)
        seq.pending = prompt[cut:]
        seq.position = cut
        self.prefix_hits += 1

    def _save_prefixes(self, seqs: list[_Sequence]) -> None:
        assert self._cache is not None
        for seq in seqs:
            if seq.save_prefix is not None:
                self._prefixes[seq.save_prefix] = self._cache.read(seq.slot, len(seq.save_prefix))
                seq.save_prefix = None
                self._trim_prefixes()

    def _trim_prefixes(self) -> None:
        while len(self._prefixes) > self.max_prefixes or (
            len(self._prefixes) > 1 and self._prefix_bytes() > self.max_prefix_bytes
        ):
            self._prefixes.popitem(last=False)

    def _prefix_bytes(self) -> int:
        return sum(a.nbytes for k, v in self._prefixes.values() for a in (*k, *v))

    def _step(self, model: LoadedLlm) -> None:
        for slot in [s for s, seq in self._active.items() if seq.job.cancelled]:
            del self._active[slot]
        if self._cache is None:
            self._cache = KVCache(model.model.cfg, self.max_batch, self.max_positions)
        self._admit(model)
        if not self._active:
            return
        seqs = list(self._active.values())
        chunks = [SeqChunk(s.slot, s.pending, s.position) for s in seqs]
        logits = model.model.forward(self._cache, chunks)
        self.steps += 1
        self._save_prefixes(seqs)
        tokens = sample_rows(logits, [s.sampler for s in seqs])
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.job.logprobs is not None and token not in model.tokenizer.special_ids:
                seq.logprobs.append(token_logprob(logits[row], token, seq.job.logprobs))
            seq.position += len(seq.pending)
            seq.pending = [token]
            reason = self._advance(model.tokenizer, seq, token)
            if reason is not None:
                del self._active[seq.slot]
                seq.job.on_done(self._result(model.tokenizer, seq, reason))
        if not self._active and not self._waiting:
            self._cache.reset()  # give the grown cache back while idle

    @staticmethod
    def _advance(tokenizer: BpeTokenizer, seq: _Sequence, token: int) -> str | None:
        """Record ``token``; the finish reason when the sequence is done."""
        if token in tokenizer.special_ids:
            return "stop"
        seq.generated.append(token)
        if seq.job.stop:
            text = tokenizer.decode(seq.generated)
            cuts = [(i, s) for s in seq.job.stop if (i := text.find(s)) >= 0]
            if cuts:
                at, seq.stop_sequence = min(cuts, key=lambda cut: cut[0])
                seq.stop_text = text[:at]
                return "stop"
        if len(seq.generated) >= seq.limit:
            return "length"
        return None

    @staticmethod
    def _result(tokenizer: BpeTokenizer, seq: _Sequence, reason: str) -> GenerationResult:
        text = seq.stop_text if seq.stop_text is not None else tokenizer.decode(seq.generated)
        return GenerationResult(
            text=text,
            token_ids=tuple(seq.generated),
            finish_reason=reason,
            prompt_tokens=seq.prompt_tokens,
            logprobs=None if seq.job.logprobs is None else _byte_logprobs(tokenizer, seq, text),
            stop_sequence=seq.stop_sequence,
        )


def _check_bias(sampling: SamplingParams, vocab_size: int) -> None:
    if sampling.logit_bias and sampling.logit_bias[-1][0] >= vocab_size:
        raise BadRequest(
            f"logit_bias: token {sampling.logit_bias[-1][0]} is not in this model's vocabulary "
            f"(ids 0 to {vocab_size - 1})",
            param="logit_bias",
        )


def _byte_logprobs(tokenizer: BpeTokenizer, seq: _Sequence, text: str) -> tuple[ByteLogprob, ...]:
    """The log probabilities of the tokens of ``text``: a token that runs into a stop string
    (cut from the text) is left out with those after it."""
    room = len(text.encode("utf-8"))
    out: list[ByteLogprob] = []
    for token, logprob, alternatives in seq.logprobs:
        data = tokenizer.token_bytes(token)
        room -= len(data)
        if room < 0:
            break
        out.append(
            (data, logprob, tuple((tokenizer.token_bytes(t), lp) for t, lp in alternatives))
        )
    return tuple(out)
