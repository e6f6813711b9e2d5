"""The adaptive concurrency limit against a simulated model server: K requests served at
once with latency L, the rest queued (latency grows with the queue), 429 past a queue."""

from __future__ import annotations

import pytest

from batchd.engine.adaptive import AdaptiveLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(
    k: int, latency: float, queue_limit: int, seconds: float = 120.0, cap: int = 512
) -> tuple[AdaptiveLimit, list[tuple[float, int, float, int]]]:
    """Run the controller against the server for ``seconds``; per step (one latency):
    (time, in flight, latency seen, answers that were 429)."""
    clock = Clock()
    ctl = AdaptiveLimit(cap=cap, clock=clock)
    trace = []
    while clock.now < seconds:
        x = ctl.current  # a batch with plenty of work keeps the limit full
        queued = max(0, x - k)
        refused = max(0, queued - queue_limit)
        served = x - refused
        rtt = latency * max(1.0, served / k)  # Little's law on the server's queue
        for i in range(x):
            ctl.on_answer(rtt if i < served else 0.001, 200 if i < served else 429, x)
        trace.append((clock.now, x, rtt, refused))
        clock.now += rtt
    return ctl, trace


@pytest.mark.parametrize("k", [8, 32, 128])
def test_finds_the_capacity_without_overloading(k: int) -> None:
    latency = 0.2
    ctl, trace = simulate(k, latency, queue_limit=k)
    steady = [t for t in trace if t[0] > 60]
    # throughput: at least 0.9 of the server's (k / latency), as the best fixed setting gets
    served = sum((x - r) / rtt for _, x, rtt, r in steady) / len(steady)
    assert served >= 0.9 * k / latency, (k, served)
    # fewer than 1% of requests refused over the whole run, the start included
    total = sum(x for _, x, _, _ in trace)
    assert sum(r for *_, r in trace) < 0.01 * total
    # latency of what the server queues stays within 2 L (interactive traffic keeps it)
    assert max(rtt for _, _, rtt, _ in steady) < 2 * latency
    assert k <= ctl.current <= 2 * k
    # slow start: a big server is reached within seconds, not minutes
    assert next(t for t, x, _, _ in trace if x >= k) < 5


def test_backs_off_on_429_and_when_the_server_slows_down() -> None:
    clock = Clock()
    ctl = AdaptiveLimit(cap=256, limit=100, clock=clock)
    for _ in range(3):
        clock.now += 1
        for _ in range(10):
            ctl.on_answer(0.1, 429, 100)
    assert ctl.current == 80  # one cut, then it waits to see the effect
    for _ in range(ctl.cooldown + 1):
        clock.now += 1
        for _ in range(10):
            ctl.on_answer(0.1, 429, 100)
    assert ctl.current == 64  # still refused: cut again
    before = ctl.current
    for step in range(20):  # the server's latency doubles, then doubles again
        clock.now += 1
        for _ in range(20):
            ctl.on_answer(0.1 * (2 if step < 10 else 4), 200, before)
    assert ctl.current < before


def test_does_not_grow_while_it_is_not_used() -> None:
    clock = Clock()
    ctl = AdaptiveLimit(cap=256, limit=40, clock=clock)
    for _ in range(50):
        clock.now += 1
        for _ in range(10):
            ctl.on_answer(0.1, 200, 5)  # only 5 in flight: the batch is nearly done
    assert ctl.current == 40


def test_random_429s_do_not_drive_the_limit_to_one() -> None:
    """A quota that refuses 10% of requests whatever the load: the limit holds up."""
    import random

    rnd = random.Random(7)
    clock = Clock()
    ctl = AdaptiveLimit(cap=256, limit=16, clock=clock)
    for _ in range(400):
        x = ctl.current
        for _ in range(x):
            ctl.on_answer(0.05, 429 if rnd.random() < 0.1 else 200, x)
        clock.now += 0.05
    assert ctl.current >= 8
