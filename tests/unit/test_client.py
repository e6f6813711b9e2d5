"""The client's pieces that need no server: the URL forms, the local input checks, the rate
and time-left estimate, and both progress displays."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from batchd.client import ClientError, api_base, first_request, out_dir
from batchd.progress import PlainDisplay, RateMeter, RichDisplay, Snapshot, display_for


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("http://host:8000", "http://host:8000/v1"),
        ("http://host:8000/", "http://host:8000/v1"),
        ("http://host:8000/v1", "http://host:8000/v1"),
        ("http://host:8000/v1/", "http://host:8000/v1"),
        ("http://host:8000/openai", "http://host:8000/openai/v1"),
        ("http://host:8000/openai/v1", "http://host:8000/openai/v1"),
        ("https://gw.example/batchd/", "https://gw.example/batchd/v1"),
        ("localhost:8000", "http://localhost:8000/v1"),
        (" http://host:8000/v1?x=1 ", "http://host:8000/v1"),
    ],
)
def test_api_base(given: str, base: str) -> None:
    assert api_base(given) == base


@pytest.mark.parametrize("bad", ["ftp://host/", "http://", "://nothing"])
def test_api_base_refuses(bad: str) -> None:
    with pytest.raises(ClientError, match="is not an http") as info:
        api_base(bad)
    assert info.value.exit_code == 2


def test_first_request(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf\n  \n{"custom_id": "a", "url": "/v1/embeddings"}\nnot json\n')
    assert first_request(path) == {"custom_id": "a", "url": "/v1/embeddings"}
    path.write_text('["a list"]\n')
    with pytest.raises(ClientError, match="line 1 is not a JSON object"):
        first_request(path)


def test_out_dir(tmp_path: Path) -> None:
    assert out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(ClientError, match="is a file, not a folder"):
        out_dir(tmp_path / "f")
    with pytest.raises(ClientError, match="cannot make the folder"):
        out_dir(tmp_path / "f" / "below")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _batch(status: str, completed: int, failed: int, total: int) -> dict[str, object]:
    counts = {"completed": completed, "failed": failed, "total": total}
    return {"status": status, "request_counts": counts}


def test_rate_and_time_left() -> None:
    clock = Clock()
    meter = RateMeter(window=30, clock=clock)
    first = meter.snapshot(_batch("validating", 0, 0, 0))
    assert first.rate is None and first.eta is None and first.eta_text == "--:--"
    clock.now += 10
    snap = meter.snapshot(_batch("in_progress", 180, 20, 1000))
    assert snap.done == 200 and snap.failed == 20
    assert snap.rate == pytest.approx(20.0) and snap.eta == pytest.approx(40.0)
    assert snap.line() == "in_progress: 200/1,000 done, 20 failed, 20.0 req/s, ETA 0:40"
    # The rate is that of the last 30 s: 10 a second now.
    for completed in (280, 380, 480, 580):
        clock.now += 10
        snap = meter.snapshot(_batch("in_progress", completed, 20, 1000))
    assert snap.done == 600 and snap.rate == pytest.approx(10.0) and snap.eta_text == "0:40"
    clock.now += 10
    stalled = meter.snapshot(_batch("in_progress", 600, 0, 10_000))  # nothing moved for 10 s
    assert stalled.rate == pytest.approx(200 / 30) and stalled.eta_text == "23:30"
    clock.now += 4000
    hours = meter.snapshot(_batch("in_progress", 700, 0, 100_000))
    assert hours.eta_text.count(":") == 2  # h:mm:ss past an hour


def test_plain_display_prints_changes_at_most_every_few_seconds() -> None:
    clock = Clock()
    out = io.StringIO()
    display = PlainDisplay(out, every=5, clock=clock)

    def show(status: str, done: int) -> None:
        display.update(Snapshot(status, done, 0, 10, 1.0, 1.0))

    show("validating", 0)
    show("validating", 0)  # nothing new
    show("in_progress", 1)  # a new status: at once
    clock.now += 1
    show("in_progress", 2)  # too soon
    clock.now += 5
    show("in_progress", 2)  # moved since the last line, 6 s ago: printed
    show("in_progress", 3)  # too soon again
    show("completed", 10)  # the end: at once
    assert [x.split(":")[0] + ":" + x.split(":")[1].split(",")[0] for x in
            out.getvalue().splitlines()] == [
        "validating: 0/10 done",
        "in_progress: 1/10 done",
        "in_progress: 2/10 done",
        "completed: 10/10 done",
    ]  # fmt: skip


def test_rich_display_redraws_in_place() -> None:
    out = io.StringIO()
    display = RichDisplay(out, force_terminal=True)
    display.update(Snapshot("in_progress", 3, 1, 10, 2.5, 2.8))
    display.update(Snapshot("in_progress", 7, 1, 10, 4.0, 0.75))
    display.close()
    text = out.getvalue()
    assert "3/10" in text and "7/10" in text and "4.0 req/s" in text and "ETA 0:01" in text
    assert "\x1b[2K" in text  # each redraw erases the line it replaces


def test_display_for_a_pipe_is_plain() -> None:
    assert isinstance(display_for(io.StringIO()), PlainDisplay)
