"""Azure OpenAI's content filter categories and severities, and the JSON it writes for them.

Azure annotates every choice with ``content_filter_results`` and every prompt with
``prompt_filter_results`` (the seed's output in shared/seeds shows the choice's)::

    "content_filter_results": {
        "hate": {"filtered": false, "severity": "safe"},
        "self_harm": {"filtered": false, "severity": "safe"},
        "sexual": {"filtered": false, "severity": "safe"},
        "violence": {"filtered": false, "severity": "safe"}
    }
    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {...}}]

When the filter could not run, Azure answers anyway and says so in place of the categories:
``{"error": {"code": "content_filter_error", "message": "The contents are not filtered"}}``.
A refused prompt is a 400 whose body is :func:`blocked_prompt_body`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from batchd.envelopes import openai_error

CATEGORIES = ("hate", "self_harm", "sexual", "violence")
SEVERITIES = ("safe", "low", "medium", "high")
SAFE, LOW, MEDIUM, HIGH = range(4)

NOT_FILTERED: dict[str, Any] = {
    "error": {"code": "content_filter_error", "message": "The contents are not filtered"}
}
BLOCKED_MESSAGE = (
    "The response was filtered due to the prompt triggering the content management policy "
    "of this service. Please modify your prompt and retry."
)


def severity_index(name: str) -> int:
    """``"medium"`` -> 2; ValueError for a name that is not one of :data:`SEVERITIES`."""
    return SEVERITIES.index(name)


@dataclass(frozen=True, slots=True)
class Assessment:
    """What a classifier found in one text: per category (in :data:`CATEGORIES` order) a
    severity index (0 safe .. 3 high) and a score in [0, 1] (the classifier's confidence that
    the text is at least of medium severity in that category)."""

    severities: tuple[int, int, int, int]
    scores: tuple[float, float, float, float]

    @staticmethod
    def of(severities: Sequence[int], scores: Sequence[float]) -> Assessment:
        """From two sequences of four, in :data:`CATEGORIES` order."""
        a, b, c, d = severities
        w, x, y, z = scores
        return Assessment((a, b, c, d), (w, x, y, z))

    @staticmethod
    def safe() -> Assessment:
        return Assessment((SAFE, SAFE, SAFE, SAFE), (0.0, 0.0, 0.0, 0.0))

    @staticmethod
    def worst(parts: Iterable[Assessment]) -> Assessment:
        """The highest severity and score of each category over ``parts`` (the chunks of one
        text, or the messages of one prompt); safe when there are none."""
        sev, score = [SAFE] * 4, [0.0] * 4
        for part in parts:
            for i in range(4):
                sev[i] = max(sev[i], part.severities[i])
                score[i] = max(score[i], part.scores[i])
        return Assessment.of(sev, score)


class Classifier(Protocol):
    """What assesses texts: the embedded classifier, or a deployment (:mod:`.remote`)."""

    async def classify(
        self, texts: Sequence[str], *, replying_to: str | None = None
    ) -> list[Assessment]:
        """One :class:`Assessment` a text, in order. ``replying_to``: the prompt the texts
        answer (a guard model judges an answer in its conversation). Raises on failure."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Per category, the lowest severity that counts as filtered (1 low .. 3 high)."""

    levels: tuple[int, int, int, int] = (MEDIUM, MEDIUM, MEDIUM, MEDIUM)

    @staticmethod
    def from_names(names: Mapping[str, str]) -> Thresholds:
        """``{"hate": "low", ...}``; a category not named keeps ``medium``."""
        levels = [MEDIUM] * 4
        for category, name in names.items():
            levels[CATEGORIES.index(category)] = severity_index(name)
        return Thresholds((levels[0], levels[1], levels[2], levels[3]))

    def filtered(self, assessment: Assessment) -> bool:
        """Whether any category reaches its threshold."""
        return any(s >= t for s, t in zip(assessment.severities, self.levels, strict=True))


def results(assessment: Assessment | None, thresholds: Thresholds) -> dict[str, Any]:
    """Azure's ``content_filter_results`` for one text; the error object when ``None`` (the
    classifier failed: the text was not filtered)."""
    if assessment is None:
        return NOT_FILTERED
    return {
        category: {"filtered": severity >= level, "severity": SEVERITIES[severity]}
        for category, severity, level in zip(
            CATEGORIES, assessment.severities, thresholds.levels, strict=True
        )
    }


def prompt_results(
    assessments: Sequence[Assessment | None], thresholds: Thresholds
) -> list[dict[str, Any]]:
    """Azure's ``prompt_filter_results``: one entry a prompt, in order."""
    return [
        {"prompt_index": i, "content_filter_results": results(a, thresholds)}
        for i, a in enumerate(assessments)
    ]


def blocked_prompt_body(assessment: Assessment, thresholds: Thresholds) -> dict[str, Any]:
    """The body of Azure's 400 for a refused prompt (``code: content_filter``, with
    ``innererror.code = "ResponsibleAIPolicyViolation"`` and the prompt's results)."""
    return openai_error(
        BLOCKED_MESSAGE,
        "invalid_request_error",
        param="prompt",
        code="content_filter",
        status=400,
        innererror={
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": results(assessment, thresholds),
        },
    )
