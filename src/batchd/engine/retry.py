"""Which upstream failures are retried, and how: the one place that decides.

Retried: 429, 408, 409 and 5xx answers, timeouts and connection errors, with exponential
backoff and full jitter (tenacity), never sooner than a ``retry-after`` the upstream sent,
until the batch's deadline or until the batch is cancelled. Any other answer is final.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    wait_random_exponential,
)

from batchd.backends.base import UpstreamError, UpstreamResponse

RETRY_STATUSES = frozenset({408, 409, 429})
_backoff = wait_random_exponential(multiplier=0.1, max=20)


def is_retryable(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


class _RetryableAnswer(Exception):
    def __init__(self, response: UpstreamResponse) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def _wait(state: RetryCallState) -> float:
    delay = _backoff(state)
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, _RetryableAnswer) and exc.response.retry_after is not None:
        delay = max(delay, exc.response.retry_after)
    return delay


async def send_with_retries(
    send: Callable[[float], Awaitable[UpstreamResponse]],
    *,
    deadline: float,
    stop: asyncio.Event,
    time_limit: float,
) -> UpstreamResponse | None:
    """Call ``send(seconds)`` until it gives a final answer. ``None`` means the request was
    given up unanswered because the batch was stopped or reached its deadline."""

    def should_stop(state: RetryCallState) -> bool:
        return stop.is_set() or time.time() + _wait(state) >= deadline

    async def sleep(seconds: float) -> None:
        # Wake at once when the batch is cancelled.
        try:
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    retrying = AsyncRetrying(
        retry=retry_if_exception_type((_RetryableAnswer, UpstreamError)),
        wait=_wait,
        stop=should_stop,
        sleep=sleep,
        reraise=False,
    )
    try:
        async for attempt in retrying:
            with attempt:
                if stop.is_set():
                    return None
                left = deadline - time.time()
                if left <= 0:
                    return None
                resp = await send(min(time_limit, left))
                if is_retryable(resp.status_code):
                    raise _RetryableAnswer(resp)
                return resp
    except RetryError:
        return None
    return None
