"""The adaptive concurrency limit against a simulated model server: K requests served at
once with latency L, the rest queued (latency grows with the queue), 429 past a queue."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from batchd.engine.adaptive import AdaptiveLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Step:
    t: float  # seconds since the start
    in_flight: int
    rtt: float  # the latency of this step's answers
    refused: int  # answers that were 429
    windows: int  # the controller's windows ended before this step


def simulate(
    k: int,
    latency: float,
    queue_limit: int,
    seconds: float = 120.0,
    cap: int = 512,
    jitter: float = 0.0,
    spike_at: int = -1,
) -> tuple[AdaptiveLimit, list[Step]]:
    """Run the controller against the server for ``seconds``, one step per latency. Each
    answer's latency is scaled by up to ``1 + jitter`` (a noisy, shared machine); the
    answers of step ``spike_at`` take 1.5 times as long (a stall that is not the server's
    queue)."""
    rnd = random.Random(k)
    clock = Clock()
    ctl = AdaptiveLimit(cap=cap, clock=clock)
    trace = []
    while clock.now < seconds:
        x = ctl.current  # a batch with plenty of work keeps the limit full
        windows = ctl.windows
        queued = max(0, x - k)
        refused = max(0, queued - queue_limit)
        served = x - refused
        rtt = latency * max(1.0, served / k)  # Little's law on the server's queue
        if len(trace) == spike_at:
            rtt *= 1.5
        for i in range(x):
            seen = rtt * (1 + jitter * rnd.random())
            ctl.on_answer(seen if i < served else 0.001, 200 if i < served else 429, x)
        trace.append(Step(clock.now, x, rtt, refused, windows))
        clock.now += rtt
    return ctl, trace


@pytest.mark.parametrize("jitter", [0.0, 0.15])
@pytest.mark.parametrize("k", [8, 32, 128])
def test_finds_the_capacity_without_overloading(k: int, jitter: float) -> None:
    latency = 0.2
    ctl, trace = simulate(k, latency, queue_limit=k, jitter=jitter)
    steady = [s for s in trace if s.t > 60]
    # throughput: at least 0.9 of the server's (k / latency), as the best fixed setting gets
    served = sum((s.in_flight - s.refused) / s.rtt for s in steady) / len(steady)
    assert served >= 0.9 * k / latency, (k, served)
    # no request refused at all, the start included: slow start doubles at most to 2 K,
    # which a queue of K still takes
    assert sum(s.refused for s in trace) == 0
    assert max(s.in_flight for s in trace) <= 2 * k
    # latency of what the server queues stays within 2 L (interactive traffic keeps it)
    assert max(s.rtt for s in steady) < 2 * latency
    assert k <= ctl.current <= 2 * k


@pytest.mark.parametrize("jitter", [0.0, 0.15])
@pytest.mark.parametrize("k", [32, 128])
def test_climbs_in_one_window_per_doubling(k: int, jitter: float) -> None:
    """From 8 to 0.9 K in log2(K / 8) windows, each window as short as the answers to the
    new level allow (about one latency here: one step), and back under 1.5 L within two
    windows of the overshoot."""
    latency = 0.2
    _, trace = simulate(k, latency, queue_limit=k, seconds=10, jitter=jitter)
    reached = next(s for s in trace if s.in_flight >= 0.9 * k)
    assert reached.windows <= math.ceil(math.log2(k / 8)), reached
    assert reached.t <= math.ceil(math.log2(k / 8)) * latency * (1 + jitter) + 1e-9
    peak = max(range(len(trace)), key=lambda i: trace[i].in_flight)
    assert trace[peak].in_flight <= 2 * k
    after = [s for s in trace if s.windows >= trace[peak].windows + 2]
    assert after and max(s.rtt for s in after) < 1.5 * latency
    assert min(s.in_flight for s in after) >= k  # and the server stays saturated


def test_recovers_from_a_slow_start_that_ended_on_noise() -> None:
    """A stall in the third window ends slow start at 32 on a server of 128: windows at the
    no-load latency then grow the limit by 1.25 times each, not by the gradient's small
    steps, and still without a 429."""
    k, latency = 128, 0.2
    _, trace = simulate(k, latency, queue_limit=k, seconds=10, spike_at=2)
    assert trace[2].in_flight == 32 and trace[3].in_flight < 64  # slow start ended there
    reached = next(s for s in trace if s.in_flight >= 0.9 * k)
    assert reached.windows <= 3 + 10, reached
    assert sum(s.refused for s in trace) == 0


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
    for step in range(20):  # the server answers in 0.2 s, then in 0.4 s
        clock.now += 1
        if step == 10:
            before = ctl.current
        for _ in range(20):
            ctl.on_answer(0.1 * (2 if step < 10 else 4), 200, ctl.current)
    assert ctl.current < 0.7 * before


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
    rnd = random.Random(7)
    clock = Clock()
    ctl = AdaptiveLimit(cap=256, limit=16, clock=clock)
    for _ in range(400):
        x = ctl.current
        for _ in range(x):
            ctl.on_answer(0.05, 429 if rnd.random() < 0.1 else 200, x)
        clock.now += 0.05
    assert ctl.current >= 8
