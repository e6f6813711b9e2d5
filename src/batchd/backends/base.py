"""The backend contract: where one request of a batch runs.

A backend takes the request's endpoint path and the raw JSON bytes of its ``body`` and
returns the status code and the raw bytes of the answer. The engine never parses HTTP and
the backend never sees a batch: limits, retries and checkpoints live in ``engine/``.

Exceptions (all derive from :class:`batchd.errors.BatchdError`)::

    UpstreamError            a request that got no HTTP answer
    ├── UpstreamTimeout      connect or read timed out        (retried)
    ├── UpstreamUnavailable  connection refused, reset, DNS   (retried)
    └── UpstreamTooLarge     the answer is over max_response_bytes (final)
    BackendUnavailable       the backend cannot run at all, e.g. a model package is missing (final)

An HTTP answer is never an exception: a 429 or a 500 is an :class:`UpstreamResponse`, and
:func:`batchd.engine.retry.classify` decides in one place whether it is retried.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from batchd.errors import BatchdError


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """An answer from a backend: its status and body exactly as sent."""

    status_code: int
    body: bytes
    request_id: str = ""
    retry_after: float | None = None  # seconds, from a ``retry-after`` header


MAX_RETRY_AFTER = 7 * 86400.0  # a longer wait is read as this long


def parse_retry_after(value: str | None) -> float | None:
    """``retry-after`` as seconds or an HTTP date; ``retry-after-ms`` handled by the caller."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError, IndexError):
            return None  # a header that cannot be read is ignored, never the answer
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def retry_after_seconds(retry_after_ms: str | None, retry_after: str | None) -> float | None:
    """The wait an answer asks for: ``retry-after-ms`` (Azure) if valid, else ``retry-after``."""
    if retry_after_ms and retry_after_ms.replace(".", "", 1).isdigit():
        return min(MAX_RETRY_AFTER, float(retry_after_ms) / 1000)
    return parse_retry_after(retry_after)


class UpstreamError(BatchdError):
    """No HTTP answer was received; the request may be retried."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamTooLarge(UpstreamError):
    """The upstream's answer is larger than ``max_response_bytes``: final, since the same
    request would get the same answer again."""

    def __init__(self, limit: int, what: str) -> None:
        super().__init__(
            f"the upstream's answer is larger than {limit} bytes {what} "
            "(deployments.max_response_bytes)"
        )


class BackendUnavailable(BatchdError):
    """The backend cannot serve any request (for example a model package is not installed).

    Final: the request goes to the error file with this message."""


class Backend(abc.ABC):
    """One deployment's way of running a request.

    ``send`` may be called concurrently up to the deployment's ``max_concurrency``; a backend
    that batches internally (the embedded model) gathers the concurrent calls itself.
    """

    @abc.abstractmethod
    async def send(self, endpoint: str, body: bytes, *, time_limit: float) -> UpstreamResponse:
        """Run one request. ``endpoint`` is canonical (``/v1/...``); ``body`` is the JSON
        object of the input line's ``body`` as bytes; ``time_limit`` is the most seconds to wait."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions, threads and models."""
