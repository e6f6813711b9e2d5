"""The ``Range`` header of a download (``GET /files/{id}/content``), per RFC 9110 §14.

Only ``bytes`` ranges; one range is served as a 206. Following RFC 9110:

- a unit other than ``bytes`` (§14.2: MUST ignore), a header that does not parse, a range
  whose last position is below its first (an *invalid* ``byte-range-spec``, §14.1.1), or a
  set of several ranges: the header is ignored and the whole file is sent (200; a server
  MAY ignore ``Range``, §14.2). ``bytes=5-2`` is such an invalid range.
- a valid set no range of which is satisfiable (every first position at or past the end,
  or a zero-length suffix): :class:`batchd.errors.RangeNotSatisfiable` (416, with
  ``Content-Range: bytes */size``, §15.5.17).
- positions past the end are cut to it (``bytes=0-`` followed by 4,400 digits is the whole
  file as a 206); numbers are ASCII digits only and never converted past 18 digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchd.errors import RangeNotSatisfiable

MAX_HEADER = 16 * 1024  # longer: ignored (a real client's header is a few dozen bytes)
_SPEC = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)
_BIG = 10**18  # any position this large is past the end of every file


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int  # first byte sent
    end: int  # one past the last byte sent

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


def _digits(digits: str) -> str:
    return digits.lstrip("0") or "0"  # leading zeros are allowed and say nothing


def _number(digits: str) -> int:
    digits = _digits(digits)
    return int(digits) if len(digits) <= 18 else _BIG


def _below(a: str, b: str) -> bool:
    """Whether the number written ``a`` is below the one written ``b`` (any length)."""
    a, b = _digits(a), _digits(b)
    return (len(a), a) < (len(b), b)


def _spec(text: str, size: int) -> ByteRange | bool | None:
    """One ``byte-range-spec``/``suffix-range``: its range within ``size``, ``None`` when
    it is unsatisfiable, ``False`` when it is invalid (does not parse, or last < first)."""
    m = _SPEC.fullmatch(text)
    if m is None or not (m.group(1) or m.group(2)):
        return False
    first, last = m.group(1), m.group(2)
    if not first:  # suffix-range: the last N bytes
        n = _number(last)
        return ByteRange(max(0, size - n), size) if n > 0 and size > 0 else None
    if last and _below(last, first):
        return False
    start = _number(first)
    if start >= size:
        return None
    end = min(size, _number(last) + 1) if last else size
    return ByteRange(start, end)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The part of a ``size``-byte file that ``header`` asks for, or ``None`` to send all of
    it. Raises :class:`RangeNotSatisfiable` (416) when no range asked for is satisfiable."""
    if not header or len(header) > MAX_HEADER:
        return None
    unit, sep, ranges = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip(" \t") for s in ranges.split(",")]
    specs = [s for s in specs if s]  # empty list elements are allowed (RFC 9110 §5.6.1)
    if not specs:
        return None
    parsed = [_spec(s, size) for s in specs]
    if any(p is False for p in parsed):
        return None
    satisfiable = [p for p in parsed if isinstance(p, ByteRange)]
    if not satisfiable:
        raise RangeNotSatisfiable(
            f"Range not satisfiable: the file has {size} bytes.",
            code="range_not_satisfiable",
            param="range",
        )
    if len(specs) > 1:
        return None  # several ranges: the whole file (no multipart/byteranges)
    return satisfiable[0]
