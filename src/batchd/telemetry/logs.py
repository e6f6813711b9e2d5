"""Logging: plain text (default) or one JSON object a line, with secrets scrubbed.

Every line about a batch carries its id and project: log with ``extra=about(batch)``.
Text lines end with `` batch=ID project=P`` (each left out when the message already says it,
as in ``batch ID (project P) completed``); JSON lines have ``batch_id`` and ``project``
keys. A JSON line is ``{"time", "level", "logger", "message", ...}`` with ``time`` in
RFC 3339 UTC, plus ``exception`` when there is a traceback.

Secrets never reach the output: the API keys of ``[auth]``, the deployments' ``api_key`` and
header values, the webhooks' ``secret``, the S3 secret key and the password of
``database_url`` are replaced by ``[redacted]`` in the formatted line, tracebacks included,
whatever logged them (our code, uvicorn, a library). Values shorter than
:data:`MIN_SECRET` characters are not scrubbed (they would garble every line).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson

from batchd.config import Settings

MIN_SECRET = 6
REDACTED = "[redacted]"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has: anything else came in ``extra`` and goes to JSON lines.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def about(batch: Any, project: str | None = None) -> dict[str, str]:
    """``extra`` for a line about a batch: a record with ``id`` (or ``batch_id``) and
    ``project``, or an id and ``project``."""
    if isinstance(batch, str):
        return {"batch_id": batch, "project": project or ""}
    batch_id = getattr(batch, "batch_id", None) or batch.id
    return {"batch_id": batch_id, "project": project or batch.project}


def secrets_of(settings: Settings) -> list[str]:
    """Every secret the configuration holds."""
    found: list[str] = []
    if settings.auth is not None:
        found.extend(settings.auth.keys)
    for d in settings.deployments:
        if d.api_key:
            found.append(d.api_key)
        found.extend(str(v) for v in (getattr(d, "headers", None) or {}).values())
    found.extend(w.secret for w in settings.webhooks if w.secret)
    if settings.s3.secret_access_key:
        found.append(settings.s3.secret_access_key)
    if settings.database_url:
        password = urlsplit(settings.database_url).password
        if password:
            found.append(password)
    return found


class _Scrubber:
    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class TextFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__(TEXT_FORMAT)
        self._scrub = _Scrubber(secrets)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        message = record.getMessage()
        batch_id = getattr(record, "batch_id", None)
        project = getattr(record, "project", None)
        context = " ".join(
            part
            for part, shown in (
                (f"batch={batch_id}", not batch_id or batch_id in message),
                (f"project={project}", not project or f"project {project}" in message),
            )
            if not shown
        )
        if context:
            head, nl, rest = line.partition("\n")
            line = f"{head} {context}{nl}{rest}"
        return self._scrub(line)


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._scrub = _Scrubber(secrets)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            # uvicorn adds ``color_message`` (the message with terminal colour codes)
            if key not in _STANDARD and not key.startswith("_") and key != "color_message":
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return self._scrub(orjson.dumps(out, default=str).decode())


def is_error_line(line: str) -> bool:
    """Whether a line in either format is of level ERROR or CRITICAL."""
    return any(
        mark in line
        for mark in (" ERROR ", " CRITICAL ", '"level":"error"', '"level":"critical"')
    )


def setup(settings: Settings) -> None:
    """Send every logger's lines to stderr in the configured format (``log_format``), at
    ``log_level``. Replaces handlers set before (it runs once a process)."""
    secrets = secrets_of(settings)
    formatter: logging.Formatter = (
        JsonFormatter(secrets) if settings.log_format == "json" else TextFormatter(secrets)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # Alembic logs each plugin it loads and each revision it applies at INFO: warnings only.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
