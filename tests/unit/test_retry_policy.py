"""The retry policy (engine/retry.py): what is retried, how often, and when it is given up."""

from __future__ import annotations

import asyncio
import time

import pytest

from batchd.backends.base import UpstreamResponse, UpstreamTimeout, UpstreamUnavailable
from batchd.engine import retry
from batchd.engine.retry import Parked, RetryPolicy, send_with_retries


class Deployment:
    def __init__(self) -> None:
        self.until = 0.0

    def pause(self, seconds: float) -> None:
        self.until = max(self.until, time.time() + seconds)

    def pause_left(self) -> float:
        return max(0.0, self.until - time.time())


class Script:
    """Answers (or exceptions) in order; the last one repeats."""

    def __init__(self, *answers: UpstreamResponse | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self, seconds: float) -> UpstreamResponse:
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


def status(code: int, retry_after: float | None = None) -> UpstreamResponse:
    return UpstreamResponse(code, b'{"error": {"message": "x"}}', "r", retry_after)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "BACKOFF_FIRST", 0.001)


async def run(
    script: Script,
    *,
    attempts: int = 4,
    deadline: float = 60,
    deployment: Deployment | None = None,
    stop: asyncio.Event | None = None,
) -> UpstreamResponse | Parked | None:
    return await send_with_retries(
        script,
        deployment=deployment or Deployment(),
        deadline=time.time() + deadline,
        stop=stop or asyncio.Event(),
        time_limit=5,
        policy=RetryPolicy(max_attempts=attempts, park_after=1.0),
    )


@pytest.mark.parametrize("final", [200, 400, 404, 409, 422])
async def test_final_answers_are_not_retried(final: int) -> None:
    script = Script(status(final))
    assert (await run(script)) == status(final)
    assert script.calls == 1


async def test_5xx_retried_up_to_max_attempts_then_final() -> None:
    script = Script(status(500))
    result = await run(script, attempts=4)
    assert isinstance(result, UpstreamResponse) and result.status_code == 500
    assert script.calls == 4


async def test_recovers_after_transient_failures() -> None:
    script = Script(status(503), UpstreamTimeout("t"), status(408), status(200))
    assert (await run(script, attempts=4)) == status(200)
    assert script.calls == 4


@pytest.mark.parametrize(
    ("exc", "code", "want"),
    [
        (UpstreamTimeout("read timed out"), 504, "upstream_timeout"),
        (UpstreamUnavailable("refused"), 502, "upstream_unreachable"),
        (RecursionError("deep"), 502, "internal_error"),
    ],
)
async def test_transport_failures_end_in_a_synthetic_error(
    exc: Exception, code: int, want: str
) -> None:
    script = Script(exc)
    result = await run(script, attempts=3)
    assert isinstance(result, UpstreamResponse) and result.status_code == code
    assert want.encode() in result.body and script.calls == 3


async def test_429_uses_no_attempt() -> None:
    script = Script(*[status(429)] * 6, status(200))
    assert (await run(script, attempts=2)) == status(200)
    assert script.calls == 7


async def test_retry_after_pauses_the_deployment() -> None:
    deployment = Deployment()
    script = Script(status(429, retry_after=0.3), status(200))
    started = time.time()
    assert (await run(script, deployment=deployment)) == status(200)
    assert time.time() - started >= 0.3
    # another sender of the deployment waits too, without a request of its own
    other = Script(status(200))
    deployment.pause(0.2)
    started = time.time()
    await run(other, deployment=deployment)
    assert time.time() - started >= 0.2 and other.calls == 1


async def test_a_long_pause_parks_and_one_past_the_deadline_is_final() -> None:
    deployment = Deployment()
    parked = await run(Script(status(429, retry_after=30)), deployment=deployment)
    assert isinstance(parked, Parked) and parked.until > time.time() + 25
    late = await run(Script(status(429, retry_after=30)), deadline=10)
    assert isinstance(late, UpstreamResponse) and late.status_code == 429


async def test_cancel_ends_a_wait_at_once() -> None:
    stop = asyncio.Event()
    deployment = Deployment()
    deployment.pause(0.9)  # under park_after: waited out, unless stopped
    task = asyncio.ensure_future(run(Script(status(200)), deployment=deployment, stop=stop))
    await asyncio.sleep(0.05)
    started = time.time()
    stop.set()
    assert (await task) is None
    assert time.time() - started < 0.2


async def test_a_5xx_retry_after_past_the_deadline_is_the_lines_answer() -> None:
    """Never left undone (the shard would be claimed and the request sent again at once)."""
    script = Script(status(503, retry_after=999_999_999))
    result = await run(script, deadline=10)
    assert isinstance(result, UpstreamResponse) and result.status_code == 503
    assert script.calls == 1


async def test_a_5xx_with_a_long_retry_after_parks_like_a_429() -> None:
    deployment = Deployment()
    script = Script(status(503, retry_after=3600))
    parked = await run(script, deployment=deployment, deadline=7200)
    assert isinstance(parked, Parked) and script.calls == 1
    assert deployment.pause_left() > 3500  # the whole deployment waits


async def test_a_request_cut_by_the_deadline_is_left_undone() -> None:
    """A request still running when the batch's window ends is not the upstream's timeout:
    it is left undone, for the finaliser to list as ``batch_expired`` (CONTRACT.md)."""

    async def slow(seconds: float) -> UpstreamResponse:
        await asyncio.sleep(seconds)
        raise UpstreamTimeout(f"no answer within {seconds} s")

    assert await run(slow, deadline=0.2) is None  # type: ignore[arg-type]
    # The upstream's own time limit, inside the window, is a timeout as before.
    result = await send_with_retries(
        slow,
        deployment=Deployment(),
        deadline=time.time() + 60,
        stop=asyncio.Event(),
        time_limit=0.05,
        policy=RetryPolicy(max_attempts=2, park_after=1.0),
    )
    assert isinstance(result, UpstreamResponse) and result.status_code == 504


async def test_a_backoff_past_the_deadline_ends_with_the_last_failure() -> None:
    result = await run(Script(status(500, retry_after=5)), attempts=10, deadline=3)
    assert isinstance(result, UpstreamResponse) and result.status_code == 500
    result = await run(Script(UpstreamTimeout("t"), status(500, retry_after=5)), deadline=3)
    assert isinstance(result, UpstreamResponse) and result.status_code == 500


def test_unreadable_retry_after_headers_are_ignored() -> None:
    from batchd.backends.base import MAX_RETRY_AFTER, parse_retry_after, retry_after_seconds

    assert parse_retry_after("Mon, 01 Jan 99999999999999999999 00:00:00 GMT") is None
    assert parse_retry_after("nan") is None and parse_retry_after("1e999") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("99999999999") == MAX_RETRY_AFTER
    assert retry_after_seconds("1500", None) == 1.5
