"""Encoding of the JSON columns (summaries, validation errors, metadata)."""

from __future__ import annotations

from typing import Any

import msgspec

from batchd.models import FileSummary, ValidationIssue

_summary_decoder = msgspec.json.Decoder(FileSummary)
_issues_decoder = msgspec.json.Decoder(list[ValidationIssue])
_meta_decoder = msgspec.json.Decoder(dict[str, str])
_encoder = msgspec.json.Encoder()


def encode(value: Any) -> bytes | None:
    return None if value is None else _encoder.encode(value)


def decode_summary(raw: bytes | None) -> FileSummary | None:
    return None if raw is None else _summary_decoder.decode(raw)


def decode_issues(raw: bytes | None) -> list[ValidationIssue] | None:
    return None if raw is None else _issues_decoder.decode(raw)


def decode_metadata(raw: bytes | None) -> dict[str, str] | None:
    return None if raw is None else _meta_decoder.decode(raw)
