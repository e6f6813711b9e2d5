"""OpenAI's moderation result (``/v1/moderations``) from the four Azure categories.

The result has OpenAI's thirteen categories (the openai SDK's ``types/moderation.py`` is the
field list). batchd's classifiers judge four; each answers the OpenAI category of the same
name (``hate``, ``self-harm``, ``sexual``, ``violence``). The other nine (harassment,
illicit and the sub-categories such as ``violence/graphic``) are not judged: they are
reported ``false`` with score 0 and an empty ``category_applied_input_types`` list, which
says that no input type was scored for them. A category is flagged at severity medium or
above; its score is the classifier's probability of that.
"""

from __future__ import annotations

from typing import Any

from batchd.contentfilter.severity import CATEGORIES, MEDIUM, Assessment

OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
JUDGED = {"hate": "hate", "self-harm": "self_harm", "sexual": "sexual", "violence": "violence"}


def moderation_result(assessment: Assessment) -> dict[str, Any]:
    """One entry of ``results``: ``flagged``, ``categories``, ``category_scores``,
    ``category_applied_input_types``."""
    categories: dict[str, bool] = {}
    scores: dict[str, float] = {}
    applied: dict[str, list[str]] = {}
    for name in OPENAI_CATEGORIES:
        azure = JUDGED.get(name)
        if azure is None:
            categories[name], scores[name], applied[name] = False, 0.0, []
            continue
        i = CATEGORIES.index(azure)
        categories[name] = assessment.severities[i] >= MEDIUM
        scores[name] = round(assessment.scores[i], 6)
        applied[name] = ["text"]
    return {
        "flagged": any(categories.values()),
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": applied,
    }
