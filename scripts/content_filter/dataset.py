"""The labelled set of the embedded content filter: reading it, and its held-out split.

Each ``*.txt`` file here holds lines ``LABELS | TEXT`` (``#`` starts a comment). ``LABELS`` is
``safe`` or comma-separated ``category:severity`` pairs (hate, self_harm, sexual, violence;
low, medium, high); a category not named is safe. A ``{group}`` in a text is filled in with
:data:`GROUPS_PER_LINE` of :data:`GROUPS`, chosen by the line's hash (the same every run).

The held-out split is made by line, before the groups are filled in: a line whose SHA-256
falls in the test third is held out with all its variants, so that no variant of a test
sentence is seen in training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATEGORIES = ("hate", "self_harm", "sexual", "violence")
SEVERITIES = ("safe", "low", "medium", "high")
GROUPS = (
    "immigrants",
    "refugees",
    "Muslims",
    "Jews",
    "Christians",
    "Black people",
    "Asians",
    "Mexicans",
    "gay people",
    "trans people",
    "women",
    "disabled people",
    "Roma",
    "Arabs",
    "Indians",
)
GROUPS_PER_LINE = 3
TEST_SHARE = 3  # one line in three is held out


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    severities: tuple[int, int, int, int]  # in CATEGORIES order, 0 safe .. 3 high
    source: str  # the file it comes from (its stem)
    line: str  # the line as written, before {group} is filled in
    test: bool


def _digest(line: str) -> int:
    return int.from_bytes(hashlib.sha256(line.encode()).digest()[:8], "big")


def _labels(field: str, where: str) -> tuple[int, int, int, int]:
    sev = [0, 0, 0, 0]
    if field.strip() == "safe":
        return (0, 0, 0, 0)
    for pair in field.split(","):
        category, _, severity = pair.strip().partition(":")
        if category not in CATEGORIES or severity not in SEVERITIES[1:]:
            raise ValueError(f"{where}: bad label {pair!r}")
        sev[CATEGORIES.index(category)] = SEVERITIES.index(severity)
    return (sev[0], sev[1], sev[2], sev[3])


def load(root: Path = HERE) -> list[Example]:
    """Every example, in file order."""
    out: list[Example] = []
    for path in sorted(root.glob("*.txt")):
        for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            raw = raw.strip()
            if not raw or raw.startswith("#"):
                continue
            field, sep, text = raw.partition(" | ")
            if not sep or not text.strip():
                raise ValueError(f"{path.name}:{n}: expected 'LABELS | TEXT'")
            labels = _labels(field, f"{path.name}:{n}")
            digest = _digest(text)
            test = digest % TEST_SHARE == 0
            texts = [text]
            if "{group}" in text:
                start = digest % len(GROUPS)
                picks = [GROUPS[(start + 5 * i) % len(GROUPS)] for i in range(GROUPS_PER_LINE)]
                texts = [_fill(text, g) for g in picks]
            out.extend(Example(t, labels, path.stem, text, test) for t in texts)
    return out


def _fill(text: str, group: str) -> str:
    filled = text.replace("{group}", group)
    return filled[0].upper() + filled[1:]


def split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held out)."""
    return [e for e in examples if not e.test], [e for e in examples if e.test]
