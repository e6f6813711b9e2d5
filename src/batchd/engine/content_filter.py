"""The content filter around one line's execution (``[content_filter] enabled = true``).

With filtering off this module is not on the engine's path at all: the shard's senders call
``ShardRun._execute`` directly. With it on, each line of a chat, completions or responses
batch goes through :meth:`ContentFilter.execute`:

- ``annotate``: the prompt is classified while the request runs upstream; the answer gets
  Azure's ``prompt_filter_results`` and, on every choice, ``content_filter_results``
  (:mod:`batchd.contentfilter.severity` has the shapes). Responses get no annotation fields
  (their object has none) but are judged as below.
- ``block``: the prompt is classified first; a prompt that reaches a threshold is not sent
  upstream and its line goes to the error file as Azure's 400 ``content_filter`` answer
  (``innererror.code = "ResponsibleAIPolicyViolation"`` with the results). An answer that
  reaches one is replaced as Azure does: ``finish_reason: "content_filter"`` and the
  choice's content removed (chat: ``content: null``; completions: ``text: ""``; logprobs
  dropped); a response becomes ``incomplete`` with ``incomplete_details.reason =
  "content_filter"`` and its message output removed. Usage is kept (the tokens were spent).

When the classifier fails (or takes longer than ``timeout``): with ``block``, it fails
closed (the prompt is not sent: a 503 ``content_filter_error`` line; an unjudged answer is
withheld); with ``annotate``, the line is served unfiltered and annotated with Azure's
``content_filter_error`` object, as Azure does. A warning is logged either way. Error lines
(non-2xx answers) are written as they are.

Classification runs beside the engine: the embedded classifier on its own thread, which
embeds the texts of every concurrent line in one batch; a deployment through its backend,
with up to :data:`CLASSIFIER_ATTEMPTS` tries of a 408, 429, 5xx or transport failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeGuard

import msgspec
import orjson

from batchd.backends.base import Backend, BackendUnavailable, UpstreamError, UpstreamResponse
from batchd.config import ContentFilterSettings
from batchd.contentfilter.remote import (
    ClassifierFailed,
    GuardClassifier,
    ModerationsClassifier,
    Send,
)
from batchd.contentfilter.severity import (
    Assessment,
    Classifier,
    Thresholds,
    blocked_prompt_body,
    prompt_results,
    results,
)
from batchd.contentfilter.texts import FILTERED_ENDPOINTS, choice_texts, prompt_texts
from batchd.engine.retry import RATE_LIMITED, Parked, backoff, is_retryable
from batchd.envelopes import openai_error
from batchd.errors import ConfigError
from batchd.models import CHAT_COMPLETIONS, COMPLETIONS, MESSAGES_ENDPOINT, RESPONSES
from batchd.results import record
from batchd.results.answer import Result as Answered
from batchd.results.answer import answer_record

log = logging.getLogger(__name__)

Result = Answered | Parked | None
CLASSIFIER_ATTEMPTS = 3
MAX_RETRY_WAIT = 5.0  # seconds: longer retry-after waits are cut to this


class ContentFilter:
    """Classifies prompts and answers with ``classifier`` and applies the thresholds."""

    def __init__(
        self, classifier: Classifier, thresholds: Thresholds, *, block: bool, timeout: float
    ) -> None:
        self.classifier = classifier
        self.thresholds = thresholds
        self.block = block
        self.timeout = timeout

    async def execute(
        self,
        run: Callable[[], Awaitable[Result]],
        endpoint: str,
        custom_id: bytes,
        body: bytes,
        started: float,
    ) -> Result:
        """``run()`` (the line's execution) with its prompt and answer filtered; ``custom_id``
        is JSON-encoded, ``body`` the line's request body, ``started`` when it was taken up
        (unix seconds)."""
        payload = _object(body) if endpoint in FILTERED_ENDPOINTS else None
        if payload is None or (endpoint == MESSAGES_ENDPOINT and not self.block):
            # An Anthropic Message has no place for annotations: only block mode applies.
            return await run()
        prompts = prompt_texts(endpoint, payload)
        if self.block:
            found = await self._prompts(prompts)
            if any(p is not None and a is None for p, a in zip(prompts, found, strict=True)):
                # Block mode fails closed: a prompt nobody could judge is not sent (else a
                # prompt made slow to judge on purpose would pass).
                return False, self._unjudged(custom_id, started), None
            flagged = [a for a in found if a is not None and self.thresholds.filtered(a)]
            if flagged:
                refusal = self._refusal(custom_id, Assessment.worst(flagged), started)
                return False, refusal, None
            result = await run()
            if not _is_output(result):
                return result
        else:
            judging = asyncio.get_running_loop().create_task(self._prompts(prompts))
            try:
                result = await run()
            except BaseException:
                judging.cancel()
                raise
            if not _is_output(result):
                judging.cancel()
                return result
            found = await judging
        return await self._judge_answer(endpoint, result, prompts, found)

    async def close(self) -> None:
        await self.classifier.close()

    # -- classification ------------------------------------------------------------------
    async def _classify(
        self, texts: Sequence[str], replying_to: str | None = None
    ) -> list[Assessment | None]:
        """The texts' assessments, or ``None`` for each when the classifier failed."""
        if not texts:
            return []
        try:
            async with asyncio.timeout(self.timeout):
                found = await self.classifier.classify(texts, replying_to=replying_to)
        except (ClassifierFailed, BackendUnavailable, TimeoutError, OSError) as exc:
            log.warning("content filter: texts not judged: %s", repr(exc))
            return [None] * len(texts)
        return list(found)

    async def _prompts(self, prompts: list[str | None]) -> list[Assessment | None]:
        judged = iter(await self._classify([p for p in prompts if p is not None]))
        return [next(judged) if p is not None else None for p in prompts]

    def _unjudged(self, custom_id: bytes, started: float) -> bytes:
        error = openai_error(
            "The content filter could not judge this prompt in time, and with "
            'action = "block" an unjudged prompt is not sent. Try the line again.',
            "server_error",
            code="content_filter_error",
        )
        resp = UpstreamResponse(503, orjson.dumps(error), f"req_{uuid.uuid4().hex}")
        return answer_record(custom_id, resp, started)[1]

    def _refusal(self, custom_id: bytes, assessment: Assessment, started: float) -> bytes:
        body = orjson.dumps(blocked_prompt_body(assessment, self.thresholds))
        resp = UpstreamResponse(400, body, f"req_{uuid.uuid4().hex}")
        return answer_record(custom_id, resp, started)[1]

    # -- the answer ----------------------------------------------------------------------
    async def _judge_answer(
        self,
        endpoint: str,
        result: Answered,
        prompts: list[str | None],
        found: list[Assessment | None],
    ) -> Result:
        _, line, usage = result
        try:
            rec = record.decode(line)
            body = orjson.loads(bytes(rec.body))
        except (msgspec.DecodeError, msgspec.ValidationError, orjson.JSONDecodeError):
            return result
        if not isinstance(body, dict):
            return result
        context = "\n".join(p for p in prompts if p) or None
        judged = await self._classify(choice_texts(endpoint, body), replying_to=context)
        if endpoint in (RESPONSES, MESSAGES_ENDPOINT):
            if self.block and judged and (judged[0] is None or self._flagged(judged[0])):
                if endpoint == RESPONSES:
                    _withhold_response(body)
                else:
                    _withhold_message(body)
        else:
            self._annotate(endpoint, body, found, judged)
        changed = msgspec.structs.replace(rec, body=msgspec.Raw(orjson.dumps(body)))
        return True, record.encode(changed), usage

    def _flagged(self, assessment: Assessment | None) -> bool:
        return assessment is not None and self.thresholds.filtered(assessment)

    def _annotate(
        self,
        endpoint: str,
        body: dict[str, Any],
        found: list[Assessment | None],
        judged: list[Assessment | None],
    ) -> None:
        body["prompt_filter_results"] = prompt_results(found, self.thresholds)
        choices = body.get("choices")
        choices = choices if isinstance(choices, list) else []
        for choice, assessment in zip(choices, judged, strict=True):  # one text a choice
            if not isinstance(choice, dict):
                continue
            choice["content_filter_results"] = results(assessment, self.thresholds)
            if self.block and (assessment is None or self._flagged(assessment)):
                _withhold_choice(endpoint, choice)  # flagged, or not judged: fail closed


def _object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # the upstream's answer tells the line what is wrong with it
    return payload if isinstance(payload, dict) else None


def _is_output(result: Result) -> TypeGuard[Answered]:
    """A succeeded record (a failed one is kept as it is)."""
    return isinstance(result, tuple) and result[0]


def _withhold_choice(endpoint: str, choice: dict[str, Any]) -> None:
    choice["finish_reason"] = "content_filter"
    choice["logprobs"] = None
    if endpoint == CHAT_COMPLETIONS:
        message = choice.get("message")
        if isinstance(message, dict):
            message["content"] = None
    elif endpoint == COMPLETIONS:
        choice["text"] = ""


def _withhold_message(body: dict[str, Any]) -> None:
    """An Anthropic Message's answer withheld as Anthropic's own refusals are: no content,
    ``stop_reason: "refusal"``."""
    body["content"] = []
    body["stop_reason"] = "refusal"
    body["stop_sequence"] = None


def _withhold_response(body: dict[str, Any]) -> None:
    body["status"] = "incomplete"
    body["incomplete_details"] = {"reason": "content_filter"}
    output = body.get("output")
    if isinstance(output, list):
        body["output"] = [
            item
            for item in output
            if not (isinstance(item, dict) and item.get("type") == "message")
        ]


def retrying_send(backend: Backend, timeout: float) -> Send:
    """``send(endpoint, body)`` through ``backend``, tried up to :data:`CLASSIFIER_ATTEMPTS`
    times on a 408, 429, 5xx or transport failure (the engine's backoff; a ``retry-after``
    is waited for up to :data:`MAX_RETRY_WAIT` seconds). The last answer is returned; a last
    transport failure raises :class:`ClassifierFailed`."""

    async def send(endpoint: str, body: bytes) -> UpstreamResponse:
        for attempt in range(1, CLASSIFIER_ATTEMPTS + 1):
            try:
                resp = await backend.send(endpoint, body, time_limit=timeout)
            except UpstreamError as exc:
                if attempt == CLASSIFIER_ATTEMPTS:
                    raise ClassifierFailed(f"the classifier is unreachable: {exc}") from exc
                await asyncio.sleep(backoff(attempt))
                continue
            code = resp.status_code
            if attempt == CLASSIFIER_ATTEMPTS or not (code == RATE_LIMITED or is_retryable(code)):
                return resp
            wait = resp.retry_after if resp.retry_after is not None else backoff(attempt)
            await asyncio.sleep(min(MAX_RETRY_WAIT, wait))
        raise AssertionError("unreachable")

    return send


def build_content_filter(
    settings: ContentFilterSettings, backends: Mapping[str, Backend]
) -> ContentFilter | None:
    """The engine's content filter, or None when ``[content_filter]`` is off. Raises
    :class:`ConfigError` when the embedded classifier's MiniLM weights are not installed
    or the classifier deployment has no backend."""
    if not settings.enabled:
        return None
    classifier: Classifier
    if settings.classifier == "embedded":
        # Imported here: an engine without the filter never loads the model code.
        from batchd.contentfilter.embedded import EmbeddedClassifier

        try:
            EmbeddedClassifier.require_weights()
        except BackendUnavailable as exc:
            raise ConfigError(f"content_filter.classifier = 'embedded': {exc}") from None
        classifier = EmbeddedClassifier(blas_threads=settings.threads or os.cpu_count() or 1)
    else:
        backend = backends.get(settings.classifier)
        if backend is None:
            raise ConfigError(f"content_filter.classifier: no deployment {settings.classifier!r}")
        send = retrying_send(backend, settings.timeout)
        if settings.classifier_api == "guard":
            classifier = GuardClassifier(send, settings.classifier)
        else:
            classifier = ModerationsClassifier(send, settings.classifier)
    thresholds = Thresholds.from_names(settings.thresholds.model_dump())
    return ContentFilter(
        classifier, thresholds, block=settings.action == "block", timeout=settings.timeout
    )
