"""Property-based tests (hypothesis) of the parsers that read client input before anything
else (issue 10): the multipart reader, the ``Range`` parser and batch-create bodies.

Each property holds for every input: an answer or one of batchd's 4xx errors, never another
exception; well-formed input is read exactly, however it is cut into chunks; a form cut
before its closing boundary is refused. The example counts are fixed (``FUZZ``) so that the
whole file runs in about 10 s on 2 cores; ``derandomize`` keeps CI reproducible.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchd.api.jsonbody import MAX_JSON_DEPTH, decode_json, json_depth
from batchd.api.ranges import ByteRange, parse_range
from batchd.api.routes import _create_batch, expires_after
from batchd.api.upload import FormParser
from batchd.blobs.local import LocalBlobs
from batchd.config import load_settings
from batchd.errors import ApiError, InvalidRequest, RangeNotSatisfiable
from batchd.service.activation import Activator
from batchd.service.batches import BatchService
from batchd.service.files import FileService
from batchd.store.connect import migrate, open_store

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# -- Range ---------------------------------------------------------------------------------------
_number = st.one_of(
    st.integers(0, 40).map(str),
    st.integers(0, 10**30).map(str),
    st.integers(4000, 5000).map(lambda n: "9" * n),
    st.builds(lambda zeros, n: "0" * zeros + str(n), st.integers(1, 5000), st.integers(0, 40)),
    st.just(""),
)
_spec = st.builds(lambda a, b: f"{a}-{b}", _number, _number)
_header = st.one_of(
    st.builds(lambda specs: "bytes=" + ",".join(specs), st.lists(_spec, min_size=1, max_size=3)),
    st.builds(lambda unit, spec: f"{unit}={spec}", st.sampled_from(["BYTES", "items", ""]), _spec),
    st.text(max_size=60),
)


def _int(digits: str) -> int:
    """The exact number, however many digits (past Python's default of 4,300)."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return int(digits)
    finally:
        sys.set_int_max_str_digits(limit)


def _reference(first_: str, last_: str, size: int) -> ByteRange | str | None:
    """RFC 9110 §14.1.1 for one spec, with plain Python numbers."""
    first = _int(first_) if first_ else None
    last = _int(last_) if last_ else None
    if first is None and last is None:
        return "ignore"
    if first is None:
        assert last is not None
        return ByteRange(max(0, size - last), size) if last and size else None
    if last is not None and last < first:
        return "ignore"
    if first >= size:
        return None
    return ByteRange(first, min(size, last + 1) if last is not None else size)


@FUZZ
@given(header=_header, size=st.integers(0, 100))
def test_range_answers_within_the_file(header: str, size: int) -> None:
    try:
        got = parse_range(header, size)
    except RangeNotSatisfiable as exc:
        assert exc.status_code == 416
        return
    assert got is None or 0 <= got.start < got.end <= size


@FUZZ
@given(first=_number, last=_number, size=st.integers(0, 100))
def test_range_single_spec_follows_the_rfc(first: str, last: str, size: int) -> None:
    want = _reference(first, last, size)
    if want is None:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(f"bytes={first}-{last}", size)
        return
    assert parse_range(f"bytes={first}-{last}", size) == (None if want == "ignore" else want)


# -- batch-create bodies --------------------------------------------------------------------------
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_field_values = {
    "input_file_id": st.one_of(_json, st.just("file-x"), st.text(max_size=200)),
    "endpoint": st.one_of(_json, st.sampled_from(["/v1/chat/completions", "/chat/completions"])),
    "completion_window": st.one_of(_json, st.just("24h")),
    "metadata": st.one_of(_json, st.dictionaries(st.text(max_size=70), st.text(max_size=600))),
    "output_expires_after": st.one_of(
        _json,
        st.fixed_dictionaries(
            {"anchor": st.just("created_at"), "seconds": st.one_of(_json, st.integers())}
        ),
    ),
}
_body = st.fixed_dictionaries({}, optional=_field_values).flatmap(
    lambda known: st.dictionaries(st.text(max_size=10), _json, max_size=3).map(
        lambda extra: {**extra, **known}
    )
)


@pytest.fixture(scope="module")
def batches() -> Iterator[tuple[asyncio.Runner, BatchService]]:
    with tempfile.TemporaryDirectory() as tmp, asyncio.Runner() as runner:
        settings_ = load_settings(None, data_dir=tmp)
        runner.run(migrate(settings_.resolved_database_url))
        store = open_store(settings_.resolved_database_url)
        yield runner, BatchService(
            settings_, store.batches, store.files, Activator(settings_, store.files, store.batches)
        )
        runner.run(store.close())


@FUZZ
@given(body=_body)
def test_batch_create_bodies(batches: tuple[asyncio.Runner, BatchService], body: Any) -> None:
    """Whatever the JSON object, the create answers with a 4xx naming the problem (there is
    no such file here, so nothing valid gets further than a 404)."""
    runner, service = batches
    req = decode_json(json.dumps(body).encode(), _create_batch)
    with pytest.raises(ApiError) as exc:
        runner.run(
            service.create(
                "p",
                input_file_id=req.input_file_id,
                endpoint=req.endpoint,
                completion_window=req.completion_window,
                metadata=req.metadata,
                output_expires_after=req.output_expires_after,
            )
        )
    assert exc.value.status_code in (400, 404)
    assert len(exc.value.message) < 400


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_batch_create_any_bytes(raw: bytes) -> None:
    try:
        decode_json(raw, _create_batch)
    except InvalidRequest as exc:
        assert exc.code == "invalid_json"


@FUZZ
@given(value=_json, depth=st.integers(0, 200))
def test_json_depth(value: Any, depth: int) -> None:
    def reference(v: Any) -> int:
        if isinstance(v, list):
            return 1 + max(map(reference, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(reference, v.values()), default=0)
        return 0

    nested = value
    for _ in range(depth):
        nested = [nested]
    raw = json.dumps(nested).encode()
    assert json_depth(raw) == reference(nested)
    if reference(nested) > MAX_JSON_DEPTH:
        with pytest.raises(InvalidRequest):
            decode_json(raw, msgspec.json.Decoder())


# -- the multipart reader ----------------------------------------------------------------------
BOUNDARY = "fuzzb0undary"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
_name = st.text("abcdefghijklmnopqrstuvwxyz_[].", min_size=1, max_size=12)
_value = st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=40)


def _form(fields: dict[str, str], content: bytes | None) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'.encode()
        for n, v in fields.items()
    ]
    if content is not None:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="in.jsonl"\r\n\r\n'.encode()
            + content
            + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@pytest.fixture(scope="module")
def files() -> Iterator[tuple[asyncio.Runner, FileService, LocalBlobs, Path]]:
    with tempfile.TemporaryDirectory() as tmp, asyncio.Runner() as runner:
        settings_ = load_settings(None, data_dir=tmp)
        blobs = LocalBlobs(Path(tmp) / "files")
        store = open_store(settings_.resolved_database_url)
        yield runner, FileService(settings_, store.files, blobs), blobs, Path(tmp) / "files"
        runner.run(store.close())


async def _read(service: FileService, chunks: list[bytes], max_body: int = 10**6) -> Any:
    parser = FormParser(CTYPE, service, max_body)
    try:
        for chunk in chunks:
            await parser.feed(chunk)
        return await parser.finish()
    except BaseException:
        await parser.abort()
        raise


def _no_blob_left(root: Path) -> None:
    assert [p for p in root.rglob("*") if p.is_file()] == []


@FUZZ
@given(
    fields=st.dictionaries(_name.filter(lambda n: n != "file"), _value, max_size=5),
    content=st.none() | st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 4000), max_size=6),
)
def test_multipart_reads_every_chunking(
    files: tuple[asyncio.Runner, FileService, LocalBlobs, Path],
    fields: dict[str, str],
    content: bytes | None,
    cuts: list[int],
) -> None:
    runner, service, blobs, _ = files
    body = _form(fields, content)
    form = runner.run(_read(service, _chunks(body, cuts)))
    assert form.fields == fields
    if content is None:
        assert form.upload is None
        return
    assert form.upload is not None
    runner.run(form.upload.commit())
    key = f"inputs/{form.upload.file_id}"
    assert runner.run(blobs.read_all(key)) == content
    runner.run(blobs.delete(key))


@FUZZ
@given(
    fields=st.dictionaries(_name.filter(lambda n: n != "file"), _value, max_size=3),
    content=st.binary(max_size=2000),
    cut=st.floats(0, 1, exclude_max=True),
    cuts=st.lists(st.integers(0, 3000), max_size=4),
)
def test_multipart_cut_short_is_refused(
    files: tuple[asyncio.Runner, FileService, LocalBlobs, Path],
    fields: dict[str, str],
    content: bytes,
    cut: float,
    cuts: list[int],
) -> None:
    runner, service, _, root = files
    body = _form(fields, content)
    short = body[: int(cut * (len(body) - 2))]  # anything before the closing "--"
    with pytest.raises(InvalidRequest) as exc:
        runner.run(_read(service, _chunks(short, cuts)))
    assert exc.value.code == "incomplete_body"
    _no_blob_left(root)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=2000),
        st.builds(
            lambda head, junk: head + junk,
            st.sampled_from(
                [
                    f"--{BOUNDARY}\r\n".encode(),
                    _form({"purpose": "batch"}, b"{}\n"),
                    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                    f'filename="a.jsonl"\r\n\r\n'.encode(),
                ]
            ),
            st.binary(max_size=500),
        ),
    ),
    cuts=st.lists(st.integers(0, 2500), max_size=5),
)
def test_multipart_any_bytes(
    files: tuple[asyncio.Runner, FileService, LocalBlobs, Path], data: bytes, cuts: list[int]
) -> None:
    """Any body: a form, or a 400/413, and no blob left behind when refused."""
    runner, service, _, root = files
    try:
        form = runner.run(_read(service, _chunks(data, cuts), max_body=2200))
    except ApiError as exc:
        assert exc.status_code in (400, 413)
        _no_blob_left(root)
        return
    if form.upload is not None:
        runner.run(form.upload.writer.abort())
    _no_blob_left(root)
    for name, value in form.fields.items():
        expires = {"expires_after[anchor]": "created_at", "expires_after[seconds]": value}
        try:
            expires_after(expires)
        except InvalidRequest as exc:
            assert exc.param == "expires_after[seconds]"
        del name
