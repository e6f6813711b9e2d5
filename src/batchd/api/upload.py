"""Streaming ``multipart/form-data`` for ``POST /files``.

The file part goes to the blob store chunk by chunk as the request body arrives; the body
is never held whole in memory or spooled to a temporary file first. Form fields are small
and kept. python-multipart's push parser calls back synchronously; the callbacks only
collect events, which are then handled asynchronously after each chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from batchd.errors import InvalidRequest
from batchd.service.files import FileService, Upload

MAX_FIELD_BYTES = 64 * 1024


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    value: bytearray = field(default_factory=bytearray)


@dataclass
class Form:
    fields: dict[str, str]
    upload: Upload | None


class _Events:
    """Collects what the parser reports for one chunk."""

    def __init__(self) -> None:
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.current = _Part()
        self.started: list[_Part] = []
        self.data: list[tuple[_Part, bytes]] = []
        self.ended: list[_Part] = []

    def on_part_begin(self) -> None:
        self.current = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.current.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self.current.headers.get(b"content-disposition", b""))
        self.current.name = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts:
            self.current.filename = opts[b"filename"].decode("utf-8", "replace")
        self.started.append(self.current)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.data.append((self.current, data[start:end]))

    def on_part_end(self) -> None:
        self.ended.append(self.current)


def _boundary(request: Request) -> bytes:
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise InvalidRequest(
            "POST /files takes multipart/form-data with a 'file' and a 'purpose'.",
            code="invalid_content_type",
        )
    return opts[b"boundary"]


class _FormReader:
    """Turns the parser's events for one chunk into form fields and upload writes."""

    def __init__(self, files: FileService, events: _Events) -> None:
        self.files = files
        self.events = events
        self.form = Form(fields={}, upload=None)
        self.file_part: _Part | None = None

    def _start_parts(self) -> None:
        for part in self.events.started:
            if part.filename is None or part.name != "file":
                continue
            if self.form.upload is not None:
                raise InvalidRequest("Only one file per upload.", param="file")
            self.form.upload = self.files.begin_upload(part.filename)
            self.file_part = part
        self.events.started.clear()

    async def _take_data(self) -> None:
        file_bytes = []
        for part, data in self.events.data:
            if part is self.file_part:
                file_bytes.append(data)
                continue
            part.value += data
            if len(part.value) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"Form field {part.name!r} is too long.", param=part.name)
        self.events.data.clear()
        if file_bytes and self.form.upload is not None:
            await self.form.upload.write(b"".join(file_bytes))

    def _end_parts(self) -> None:
        for part in self.events.ended:
            if part is not self.file_part and part.name:
                self.form.fields[part.name] = part.value.decode("utf-8", "replace")
        self.events.ended.clear()

    async def handle(self) -> None:
        self._start_parts()
        await self._take_data()
        self._end_parts()


async def read_form(request: Request, files: FileService) -> Form:
    """Parse the form, streaming the ``file`` part into a new upload. On error the upload
    is aborted and nothing is left in storage."""
    events = _Events()
    parser = MultipartParser(
        _boundary(request),
        {
            "on_part_begin": events.on_part_begin,
            "on_header_field": events.on_header_field,
            "on_header_value": events.on_header_value,
            "on_header_end": events.on_header_end,
            "on_headers_finished": events.on_headers_finished,
            "on_part_data": events.on_part_data,
            "on_part_end": events.on_part_end,
        },
    )
    reader = _FormReader(files, events)
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except Exception as exc:
                raise InvalidRequest(
                    f"Malformed multipart body: {exc}", code="invalid_body"
                ) from None
            await reader.handle()
        parser.finalize()
        await reader.handle()
    except BaseException:
        if reader.form.upload is not None:
            await reader.form.upload.writer.abort()
        raise
    return reader.form
