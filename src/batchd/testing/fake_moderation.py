"""The fake upstream's classifiers: a moderation model and a guard model, by word lists.

A deterministic stand-in for a real classifier, for tests: a text containing one of the
words below (case-insensitive) is flagged in that OpenAI moderation category with a score
of 0.95; the other categories score 0.0012. ``self-harm/intent`` follows ``self-harm`` when
the text speaks of "myself". The moderation answer has OpenAI's shape (all thirteen
categories, as the openai SDK's ``types/moderation.py`` lists them); the guard answer is
Llama Guard 3's (``safe``, or ``unsafe`` and a line of hazard codes).
"""

from __future__ import annotations

import uuid
from typing import Any

from batchd.contentfilter.moderation import OPENAI_CATEGORIES

FLAG_WORDS: dict[str, tuple[str, ...]] = {
    "violence": ("kill", "attack", "shoot", "stab", "bomb"),
    "hate": ("vermin", "subhuman"),
    "self-harm": ("hurt myself", "end my life", "suicide"),
    "sexual": ("explicit", "nude", "porn"),
    "harassment": ("idiot", "loser"),
}
GUARD_CODES = {"violence": "S1", "hate": "S10", "self-harm": "S11", "sexual": "S12"}
CATEGORIES = OPENAI_CATEGORIES  # the thirteen of the openai SDK's types/moderation.py
FLAGGED_SCORE = 0.95
LOW_SCORE = 0.0012


def flagged_categories(text: str) -> list[str]:
    """The moderation categories whose words ``text`` contains, in :data:`FLAG_WORDS` order."""
    lower = text.lower()
    found = [c for c, words in FLAG_WORDS.items() if any(w in lower for w in words)]
    if "self-harm" in found and "myself" in lower:
        found.append("self-harm/intent")
    return found


def moderation_result(text: str) -> dict[str, Any]:
    found = set(flagged_categories(text))
    return {
        "flagged": bool(found),
        "categories": {c: c in found for c in CATEGORIES},
        "category_scores": {c: FLAGGED_SCORE if c in found else LOW_SCORE for c in CATEGORIES},
        "category_applied_input_types": {c: ["text"] for c in CATEGORIES},
    }


def moderation_answer(model: str, value: Any) -> dict[str, Any]:
    """The answer to ``{"model", "input"}``: one result a string, or one for a list of
    multi-modal parts (their texts together)."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        texts = list(value)
    else:
        parts = value if isinstance(value, list) else []
        texts = [" ".join(p.get("text", "") for p in parts if isinstance(p, dict))]
    return {
        "id": f"modr-{uuid.uuid4().hex}",
        "model": model,
        "results": [moderation_result(t) for t in texts],
    }


def guard_verdict(text: str) -> str:
    """Llama Guard's answer about ``text``: ``safe`` or ``unsafe\\nS1,S10``."""
    codes = [GUARD_CODES[c] for c in flagged_categories(text) if c in GUARD_CODES]
    return "unsafe\n" + ",".join(codes) if codes else "safe"
