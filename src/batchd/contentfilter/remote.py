"""A deployment as the content filter's classifier: a moderation server or a guard model.

**A ``/v1/moderations`` server** (OpenAI's, or any that answers in its shape, batchd's own
``omni-moderation-latest`` included). All texts of a call go in one request
(``input: [texts]``). OpenAI's categories map to Azure's four as follows; a category's score
is the highest of its sources::

    hate       <- hate, hate/threatening, harassment, harassment/threatening
    self_harm  <- self-harm, self-harm/intent, self-harm/instructions
    sexual     <- sexual, sexual/minors
    violence   <- violence, violence/graphic, hate/threatening, harassment/threatening,
                  illicit/violent
    (none)     <- illicit

(Azure's hate category covers harassment and bullying; threats count as violence.) The
severity comes from the score: below 0.1 safe, below 0.5 low, below 0.9 medium, else high;
a category the server flagged is at least medium, so that the default threshold filters
what the server flags.

**A guard model** answering chat completions in Llama Guard's format: ``safe``, or
``unsafe`` and a line of hazard codes (``unsafe\\nS1,S10``). A prompt is sent as the user's
turn; an answer as the assistant's turn after its prompt. Llama Guard 3's codes (MLCommons
hazards, also Llama Guard 4's) map to Azure's four::

    violence   <- S1 violent crimes, S9 indiscriminate weapons
    sexual     <- S3 sex-related crimes, S4 child sexual exploitation, S12 sexual content
    hate       <- S10 hate
    self_harm  <- S11 suicide and self-harm
    (none)     <- S2, S5-S8, S13, S14 (non-violent crimes, defamation, specialised advice,
                  privacy, intellectual property, elections, code interpreter abuse)

A guard model gives no severity: a category it names is ``high`` (score 1), the others
``safe`` (score 0). An answer in neither form fails the call.

Both send through ``send(endpoint, body)`` (see :mod:`batchd.engine.content_filter`, which
retries it); any failure raises :class:`ClassifierFailed`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson

from batchd.backends.base import UpstreamResponse
from batchd.contentfilter.severity import CATEGORIES, HIGH, LOW, MEDIUM, SAFE, Assessment
from batchd.errors import BatchdError
from batchd.models import CHAT_COMPLETIONS, MODERATIONS

Send = Callable[[str, bytes], Awaitable[UpstreamResponse]]

MODERATION_SOURCES: dict[str, tuple[str, ...]] = {
    "hate": ("hate", "hate/threatening", "harassment", "harassment/threatening"),
    "self_harm": ("self-harm", "self-harm/intent", "self-harm/instructions"),
    "sexual": ("sexual", "sexual/minors"),
    "violence": (
        "violence",
        "violence/graphic",
        "hate/threatening",
        "harassment/threatening",
        "illicit/violent",
    ),
}
SCORE_BANDS = ((0.9, HIGH), (0.5, MEDIUM), (0.1, LOW))  # lowest score of each severity
GUARD_CODES: dict[str, str] = {
    "S1": "violence",
    "S9": "violence",
    "S3": "sexual",
    "S4": "sexual",
    "S12": "sexual",
    "S10": "hate",
    "S11": "self_harm",
}
GUARD_MAX_TOKENS = 20
_CODE = re.compile(r"^S\d{1,2}$")


class ClassifierFailed(BatchdError):
    """The classifier gave no usable answer (after the retries of ``send``)."""


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return min(1.0, max(0.0, float(value)))


def from_moderation(result: Mapping[str, Any]) -> Assessment:
    """One ``results`` entry of a moderation response -> the four categories."""
    flags = result.get("categories")
    scores = result.get("category_scores")
    if not isinstance(flags, dict) or not isinstance(scores, dict):
        raise ClassifierFailed("a moderation result without categories and category_scores")
    sev, score = [SAFE] * 4, [0.0] * 4
    for i, category in enumerate(CATEGORIES):
        sources = MODERATION_SOURCES[category]
        score[i] = max(_number(scores.get(name)) for name in sources)
        sev[i] = next((level for low, level in SCORE_BANDS if score[i] >= low), SAFE)
        if any(flags.get(name) is True for name in sources):
            sev[i] = max(sev[i], MEDIUM)
    return Assessment.of(sev, score)


def from_guard(answer: str) -> Assessment:
    """A guard model's answer (``safe`` / ``unsafe\\nS1,S10``) -> the four categories."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    if lines and lines[0].lower() == "safe":
        return Assessment.safe()
    if not lines or lines[0].lower() != "unsafe":
        raise ClassifierFailed(f"the guard model answered {answer[:80]!r}, not safe/unsafe")
    codes = [c.strip().upper() for c in ",".join(lines[1:]).split(",") if c.strip()]
    if any(not _CODE.match(c) for c in codes):
        raise ClassifierFailed(f"the guard model named unknown categories in {answer[:80]!r}")
    named = {GUARD_CODES[c] for c in codes if c in GUARD_CODES}
    return Assessment.of(
        [HIGH if c in named else SAFE for c in CATEGORIES],
        [1.0 if c in named else 0.0 for c in CATEGORIES],
    )


def _json(resp: UpstreamResponse) -> Any:
    if not 200 <= resp.status_code < 300:
        text = resp.body[:200].decode("utf-8", "replace")
        raise ClassifierFailed(f"the classifier answered {resp.status_code}: {text}")
    try:
        return orjson.loads(resp.body)
    except orjson.JSONDecodeError as exc:
        raise ClassifierFailed(f"the classifier's answer is not JSON: {exc}") from None


class _Deployment:
    """A classifier that is a deployment: ``send`` reaches it, ``model`` names it."""

    def __init__(self, send: Send, model: str) -> None:
        self._send = send
        self.model = model

    async def close(self) -> None:
        """The deployment's backend is the engine's; nothing of its own to release."""


class ModerationsClassifier(_Deployment):
    """A deployment answering ``/v1/moderations``: all texts in one request."""

    async def classify(
        self, texts: Sequence[str], *, replying_to: str | None = None
    ) -> list[Assessment]:
        if not texts:
            return []
        body = orjson.dumps({"model": self.model, "input": list(texts)})
        doc = _json(await self._send(MODERATIONS, body))
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, list) or len(results) != len(texts):
            raise ClassifierFailed(f"the moderation answer has no result for each of {len(texts)}")
        return [from_moderation(r if isinstance(r, dict) else {}) for r in results]


class GuardClassifier(_Deployment):
    """A guard model deployment answering chat completions, one request a text."""

    async def classify(
        self, texts: Sequence[str], *, replying_to: str | None = None
    ) -> list[Assessment]:
        return list(await asyncio.gather(*(self._one(t, replying_to) for t in texts)))

    async def _one(self, text: str, replying_to: str | None) -> Assessment:
        if replying_to is None:
            messages = [{"role": "user", "content": text}]
        else:
            messages = [
                {"role": "user", "content": replying_to},
                {"role": "assistant", "content": text},
            ]
        body = orjson.dumps(
            {
                "model": self.model,
                "messages": messages,
                "max_tokens": GUARD_MAX_TOKENS,
                "temperature": 0,
            }
        )
        doc = _json(await self._send(CHAT_COMPLETIONS, body))
        try:
            content = doc["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise ClassifierFailed("the guard model's answer has no message content")
        return from_guard(content)
