"""Streaming ``multipart/form-data`` for ``POST /files``: all or nothing.

The file part goes to the blob store chunk by chunk as the request body arrives; the body
is never held whole in memory or spooled to a temporary file first. Form fields are small
and kept. python-multipart's push parser calls back synchronously; the callbacks only
collect events, which are then handled asynchronously after each slice.

Bounds (each refusal aborts the upload, so nothing is stored or listed):

- the body must end with the closing boundary (RFC 7578 / RFC 2046 §5.1.1): a body cut
  short, or one whose ``Content-Length`` is shorter than the form, is a 400
  ``incomplete_body`` (python-multipart does not check this itself);
- at most :data:`MAX_PARTS` parts, :data:`MAX_HEADER_BYTES` of headers per part and
  :data:`MAX_FIELD_BYTES` of fields other than the file, together: 400;
- the whole body at most ``max_file_bytes`` + :data:`FORM_OVERHEAD`: 413;
- the parser is fed at most :data:`SLICE` bytes at a time and the event loop runs other
  tasks between slices (a slice of the worst form takes ~5 ms to parse);
- a body that stops arriving is cut by :class:`batchd.api.bodyguard.BodyGuard` (408).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request

from batchd.errors import ApiError, InvalidRequest, TooLarge
from batchd.service.files import FileService, Upload

MAX_PARTS = 16
MAX_HEADER_BYTES = 8 * 1024
MAX_FIELD_BYTES = 64 * 1024
FORM_OVERHEAD = MAX_FIELD_BYTES + MAX_PARTS * (MAX_HEADER_BYTES + 512)
SLICE = 64 * 1024


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
    """Collects what the parser reports for one slice, and enforces the form's bounds."""

    def __init__(self) -> None:
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.header_bytes = 0
        self.parts = 0
        self.current = _Part()
        self.started: list[_Part] = []
        self.data: list[tuple[_Part, bytes]] = []
        self.ended: list[_Part] = []

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequest(
                f"The form has more than {MAX_PARTS} parts.", code="too_many_form_fields"
            )
        self.current = _Part()
        self.header_bytes = 0

    def _header_bytes(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            raise InvalidRequest(
                f"A form part has more than {MAX_HEADER_BYTES} bytes of headers.",
                code="invalid_body",
            )

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
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


def boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; 400 for any other type."""
    ctype, opts = parse_options_header(content_type)
    value = opts.get(b"boundary", b"")
    if ctype != b"multipart/form-data" or not 1 <= len(value) <= 70:  # RFC 2046 §5.1.1
        raise InvalidRequest(
            "POST /files takes multipart/form-data (with a boundary of 1 to 70 characters) "
            "with a 'file' and a 'purpose'.",
            code="invalid_content_type",
        )
    return value


class _FormReader:
    """Turns the parser's events for one slice into form fields and upload writes."""

    def __init__(self, files: FileService, events: _Events, hashed: bool = False) -> None:
        self.files = files
        self.hashed = hashed
        self.events = events
        self.form = Form(fields={}, upload=None)
        self.file_part: _Part | None = None
        self.field_bytes = 0

    def _start_parts(self) -> None:
        for part in self.events.started:
            if part.filename is None or part.name != "file":
                continue
            if self.form.upload is not None:
                raise InvalidRequest("Only one file per upload.", param="file")
            self.form.upload = self.files.begin_upload(part.filename, hashed=self.hashed)
            self.file_part = part
        self.events.started.clear()

    async def _take_data(self) -> None:
        file_bytes = []
        for part, data in self.events.data:
            if part is self.file_part:
                file_bytes.append(data)
                continue
            part.value += data
            self.field_bytes += len(data)
            if self.field_bytes > MAX_FIELD_BYTES:
                raise InvalidRequest(
                    f"The form's fields other than the file exceed {MAX_FIELD_BYTES} bytes.",
                    code="invalid_body",
                    param=part.name[:64] or None,
                )
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


class FormParser:
    """The push parser and the form's bounds, fed the body as it arrives (usable without a
    request: the fuzz tests drive it directly)."""

    def __init__(
        self, content_type: str, files: FileService, max_body: int, *, hashed: bool = False
    ) -> None:
        self.events = _Events()
        self.reader = _FormReader(files, self.events, hashed)
        self.max_body = max_body
        self.received = 0
        events = self.events
        self._parser = MultipartParser(
            boundary(content_type),
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

    @property
    def form(self) -> Form:
        return self.reader.form

    async def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_body:
            raise TooLarge(
                f"The upload is larger than the limit of {self.max_body} bytes.",
                code="file_too_large",
                param="file",
            )
        for at in range(0, len(chunk), SLICE):
            if self._parser.state == MultipartState.END:
                return  # an epilogue after the closing boundary: ignored (RFC 2046)
            try:
                self._parser.write(chunk[at : at + SLICE])
            except ApiError:
                raise
            except Exception as exc:
                raise InvalidRequest(
                    f"Malformed multipart body: {str(exc)[:200]}", code="invalid_body"
                ) from None
            await self.reader.handle()
            if len(chunk) > SLICE:
                await asyncio.sleep(0)  # let other requests run between slices

    async def finish(self) -> Form:
        """The form, once the body has ended; 400 unless it ended with its closing boundary."""
        if self._parser.state != MultipartState.END:
            raise InvalidRequest(
                "The multipart body ended before its closing boundary (cut short, or a "
                "Content-Length shorter than the form): nothing was stored.",
                code="incomplete_body",
            )
        await self.reader.handle()
        return self.reader.form

    async def abort(self) -> None:
        if self.reader.form.upload is not None:
            await self.reader.form.upload.writer.abort()


async def read_form(request: Request, files: FileService, *, hashed: bool = False) -> Form:
    """Parse the form, streaming the ``file`` part into a new upload (``hashed``: its
    sha256 computed on the way, :meth:`Upload.content_sha256`). On error the upload is
    aborted and nothing is left in storage."""
    parser = FormParser(
        request.headers.get("content-type", ""),
        files,
        files.max_file_bytes + FORM_OVERHEAD,
        hashed=hashed,
    )
    try:
        async for chunk in request.stream():
            if chunk:
                await parser.feed(chunk)
        return await parser.finish()
    except BaseException:
        await asyncio.shield(parser.abort())
        raise
