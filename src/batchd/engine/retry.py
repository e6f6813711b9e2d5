"""Which upstream failures are retried, and how: the one place that decides.

- **Failures of the line** (408, 5xx, timeouts, connection errors, and any unexpected error
  while sending; not an answer over ``max_response_bytes``, final at once as
  ``upstream_response_too_large``) are retried with exponential backoff and full jitter
  (0.1 s doubling up to 20 s, as tenacity's ``wait_random_exponential``), never sooner than
  a ``retry-after`` the upstream sent, up to the deployment's ``max_attempts`` tries. After
  the last one the upstream's last answer is final; a transport failure becomes a synthetic
  answer in OpenAI's error shape (``upstream_timeout`` 504, ``upstream_unreachable`` 502).
- **Rate limiting** (429) is not a failure of the line and uses up no attempt. A
  ``retry-after`` pauses the whole deployment (:class:`Pausable`): every sender of it waits,
  as good clients do. A pause longer than ``park_after`` seconds is not waited out while
  holding the shard: :class:`Parked` tells the shard to let go of its lease until then.
- A wait that would end past the batch's deadline is not waited for: the last answer (or
  transport failure) is then the line's answer; a deployment pause past it parks the shard
  until the batch expires. A 5xx whose ``retry-after`` is longer than ``park_after`` pauses
  the deployment as a 429 does (and still uses up an attempt). Cancel ends every wait.
- Any other answer (2xx, 4xx, 409 included) is final.

The loop is written out by hand rather than with tenacity's ``AsyncRetrying``: it runs once
per request, and on the path where the first answer is final (nearly every request) it costs
one call and a few comparisons, where ``AsyncRetrying`` cost about 15% of the engine's CPU.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from batchd.backends.base import (
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from batchd.envelopes import openai_error

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408})
RATE_LIMITED = 429
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 20.0
DEFAULT_MAX_ATTEMPTS = 10


def is_retryable(status: int) -> bool:
    """A failure of the line that another try may fix (429 is handled apart)."""
    return status in RETRY_STATUSES or status >= 500


def backoff(attempt: int) -> float:
    """Seconds to wait after the ``attempt``-th failure (1-based): full jitter over
    ``0.1 * 2 ** (attempt - 1)``, capped at 20 s."""
    high = BACKOFF_MAX if attempt > 16 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempt - 1))
    return random.uniform(0, high)


class Pausable(Protocol):
    """A deployment that can be told to pause (by a ``retry-after``) for all its senders."""

    def pause(self, seconds: float) -> None: ...

    def pause_left(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Parked:
    """The deployment is paused until ``until`` (unix seconds): too long to hold the shard."""

    until: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    park_after: float = 5.0  # a deployment pause longer than this parks the shard


def transport_failure(exc: BaseException) -> UpstreamResponse:
    """The answer recorded for a request that never got one: OpenAI's error shape."""
    if isinstance(exc, UpstreamTimeout):
        status, code = 504, "upstream_timeout"
    elif isinstance(exc, UpstreamTooLarge):
        status, code = 502, "upstream_response_too_large"
    elif isinstance(exc, UpstreamError):
        status, code = 502, "upstream_unreachable"
    else:
        status, code = 502, "internal_error"
    body = orjson.dumps(
        openai_error(
            f"No answer from the upstream after the last attempt: {exc}",
            "upstream_error",
            code=code,
        )
    )
    return UpstreamResponse(status, body)


async def _sleep(seconds: float, stop: asyncio.Event) -> None:
    """Sleep, but wake at once when the batch is stopped."""
    if seconds <= 0:
        return
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


def _no_hook(failure: UpstreamResponse | BaseException) -> None:
    pass


async def send_with_retries(  # noqa: C901 - the policy, one branch per case of the docstring
    send: Callable[..., Awaitable[UpstreamResponse]],
    *args: object,
    deployment: Pausable,
    deadline: float,
    stop: asyncio.Event,
    time_limit: float,
    policy: RetryPolicy,
    on_retry: Callable[[UpstreamResponse | BaseException], None] = _no_hook,
) -> UpstreamResponse | Parked | None:
    """Call ``send(*args, seconds)`` until it gives a final answer (see the module's docstring).
    ``on_retry`` hears of each failed attempt that is tried again (for metrics).

    Returns the final answer, :class:`Parked` when the deployment is paused for longer than
    ``policy.park_after`` (or past the deadline), or ``None`` when the batch was stopped or
    its deadline has passed. Never raises for a failure of the upstream."""
    failures = 0
    limited = 0
    while True:
        if stop.is_set():
            return None
        paused = deployment.pause_left()
        if paused > 0:
            if paused > policy.park_after:
                return Parked(time.time() + paused)
            if time.time() + paused >= deadline:
                return Parked(time.time() + paused)  # the batch expires meanwhile
            await _sleep(paused, stop)
            continue
        left = deadline - time.time()
        if left <= 0:
            return None
        retry_after: float | None = None
        failure: UpstreamResponse | BaseException
        try:
            resp = await send(*args, min(time_limit, left))
        except Exception as exc:
            if left < time_limit and time.time() >= deadline:
                # Cut by the batch's deadline, not by the upstream: the request was not
                # completed in the window, so it is left undone (``batch_expired``).
                return None
            if not isinstance(exc, UpstreamError):
                log.warning("sending a request failed unexpectedly", exc_info=True)
            failures += 1
            if failures >= policy.max_attempts or isinstance(exc, UpstreamTooLarge):
                return transport_failure(exc)
            delay, failure = backoff(failures), exc
        else:
            failure = resp
            status = resp.status_code
            if status == RATE_LIMITED:
                limited += 1
                retry_after = resp.retry_after
                if retry_after is not None and retry_after > 0:
                    if time.time() + retry_after >= deadline:
                        return resp  # not waited for: the 429 is the line's answer
                    deployment.pause(retry_after)
                    on_retry(resp)
                    continue
                delay = backoff(limited)
            elif is_retryable(status):
                failures += 1
                if failures >= policy.max_attempts:
                    return resp
                retry_after = resp.retry_after
                if retry_after is not None and retry_after > policy.park_after:
                    # A long wait asked with a 5xx (503 + retry-after): a deployment pause
                    # too, so that the line holds no shard meanwhile.
                    if time.time() + retry_after >= deadline:
                        return resp
                    deployment.pause(retry_after)
                    on_retry(resp)
                    continue
                delay = max(backoff(failures), retry_after or 0.0)
            else:
                return resp
        if time.time() + delay >= deadline:
            # Not waited for: the last failure is the line's answer (never left undone for
            # the shard to be claimed and the request sent again at once).
            return failure if isinstance(failure, UpstreamResponse) else transport_failure(failure)
        on_retry(failure)
        await _sleep(delay, stop)
