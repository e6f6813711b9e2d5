"""Validation of a batch input file: one streamed pass over its stored bytes.

It finds every bad line (up to :data:`MAX_ISSUES`), records what the batch checks need (the
urls and models used, with the lines that use them) and cuts the file into shards: byte
ranges of whole lines that the engine claims. Memory: the custom ids seen (to find
duplicates, in an :class:`IdSet`: about 30 bytes an id) and the chunk being fed. It runs on
a worker thread; the caller feeds chunks.

Speed: a line is decoded twice (the line with its body as raw bytes, then the body's head):
measured faster than one decode into nested structs. Nearly every line takes the fast path
(typed structs, no issue); the others go through the precise path that words each issue.

Codes checked here (endpoint-independent): ``invalid_json_line``, ``missing_required_parameter``,
``invalid_request``, ``duplicate_custom_id``, ``streaming_unsupported``, ``model_mismatch``,
``too_many_tasks``, ``empty_file``. The batch adds ``url_mismatch`` and ``model_not_found``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from batchd.models import FileSummary, ShardSpan, ValidationIssue, normalise_endpoint
from batchd.service.idset import IdSet
from batchd.service.input_line import (
    DECODE_ERRORS,
    NonEmpty,
    estimate_tokens,
    head_decoder,
    issue_param,
    loose_head_decoder,
)

MAX_ISSUES = 100
MAX_LINES_PER_KEY = 100  # lines remembered per url / model, for mismatch reports
SHARD_MAX_BYTES = 8 * 1024 * 1024


class InputLine(msgspec.Struct):
    """The fields of an input line, with ``body`` kept as raw bytes."""

    custom_id: Any = msgspec.UNSET
    method: Any = msgspec.UNSET
    url: Any = msgspec.UNSET
    body: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class _GoodLine(msgspec.Struct):
    """An input line as the fast path accepts it: every check that msgspec can do in C is
    in the types; a line that does not decode into it goes through the precise path."""

    custom_id: NonEmpty
    method: Literal["POST"]
    url: str
    body: msgspec.Raw


_line_decoder = msgspec.json.Decoder(InputLine)
_good_line_decoder = msgspec.json.Decoder(_GoodLine)

BOM = b"\xef\xbb\xbf"


class Validator:
    """Feed chunks with :meth:`feed`, then call :meth:`finish` for the summary."""

    def __init__(self, *, max_lines: int, max_line_bytes: int, shard_lines: int) -> None:
        self.summary = FileSummary()
        self._max_lines = max_lines
        self._max_line_bytes = max_line_bytes
        self._shard_lines = shard_lines
        self._custom_ids = IdSet()
        self._tail = bytearray()
        self._offset = 0  # offset of the first byte of self._tail
        self._line_no = 0  # physical lines seen (1-based numbering, blank lines count)
        self._shard: list[int] = []  # [start, first_line, count]
        self._shard_end = 0
        self._urls: dict[str, str] = {}  # url as written -> canonical, computed once per url
        self._dropped = 0  # length of a line over max_line_bytes, whose bytes are not kept
        self._at_start = True  # nothing seen yet: a byte order mark may come

    # -- reporting -------------------------------------------------------------------
    def _issue(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        if len(self.summary.issues) < MAX_ISSUES:
            self.summary.issues.append(ValidationIssue(code, message, line, param))

    def _not_jsonl(self, message: str, line: int) -> None:
        self.summary.jsonl_ok = False
        self._issue("invalid_json_line", message, line)

    @staticmethod
    def _remember(table: dict[str, list[int]], key: str, line: int) -> None:
        entry = table.get(key)
        if entry is None:
            if len(table) < 64:
                table[key] = [1, line]
            return
        entry[0] += 1
        if len(entry) <= MAX_LINES_PER_KEY:
            entry.append(line)

    # -- the pass ----------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        """Check the next bytes of the file. Linear in the input whatever its shape: a line
        that runs across chunks is gathered in a growing buffer, and one longer than
        ``max_line_bytes`` is only counted, not kept."""
        if self._at_start:
            # A leading UTF-8 byte order mark (Windows editors write one) is not part of the
            # first line: skipped, and the shards' byte offsets count from after it.
            head = bytes(self._tail) + chunk
            if len(head) < len(BOM) and BOM.startswith(head):
                self._tail = bytearray(head)
                return
            self._at_start = False
            self._tail = bytearray()
            if head.startswith(BOM):
                head = head[len(BOM) :]
                self._offset = len(BOM)
            chunk = head
        last = chunk.rfind(b"\n")
        if last < 0:
            self._keep_tail(chunk)
            return
        start = 0
        if self._tail or self._dropped:  # the line that runs across the chunks
            start = chunk.find(b"\n") + 1
            if self._dropped:
                self._too_long_line(self._dropped + start)
            else:
                self._tail += chunk[:start]
                self._lines(bytes(self._tail), 0, len(self._tail))
            self._tail, self._dropped = bytearray(), 0
        self._lines(chunk, start, last + 1)
        self._keep_tail(chunk[last + 1 :])

    def _keep_tail(self, data: bytes) -> None:
        """Keep the start of a line whose end has not arrived yet (only its length once it
        is longer than a line may be)."""
        if self._dropped:
            self._dropped += len(data)
        elif len(self._tail) + len(data) > self._max_line_bytes:
            self._dropped = len(self._tail) + len(data)
            self._tail = bytearray()
        else:
            self._tail += data

    def _too_long_line(self, length: int) -> None:
        """A line of ``length`` bytes (with its newline) over the limit: reported, skipped."""
        self._line_no += 1
        n = self._line_no
        self._not_jsonl(f"Line {n} is longer than {self._max_line_bytes} bytes.", n)
        self._offset += length

    def _lines(self, buf: bytes, start: int, stop: int) -> None:
        """Check the whole lines of ``buf[start:stop]`` (which ends with ``\\n``); they
        follow each other from ``self._offset``. A line that is well-formed and raises no
        issue (nearly all of them) is checked here with one decode of the line and one of
        its body, into typed structs, on a view of ``buf`` (no copy); any other line goes
        through :meth:`_line`, the precise path that words every issue, with nothing
        recorded here for it first: the result is the same as :meth:`_line` for every line."""
        s = self.summary
        add_id = self._custom_ids.add
        urls = self._urls
        url_table, model_table = s.urls, s.models
        max_bytes = self._max_line_bytes
        max_lines = self._max_lines
        shard_lines = self._shard_lines
        decode_line = _good_line_decoder.decode
        decode_head = head_decoder.decode
        fast_errors = (*DECODE_ERRORS, UnicodeDecodeError)
        ascii_only = buf.isascii()
        find = buf.find
        view = memoryview(buf)
        base = self._offset - start  # a line's offset in the file: its index in buf + base
        n = self._line_no
        count, tokens = s.lines, s.token_estimate  # kept here, written back for _line
        last_url: str | None = None  # the previous line's url and model, with their entries
        last_model: str | None = None
        url_entry: list[int] | None = None
        model_entry: list[int] | None = None
        while start < stop:
            nl = find(b"\n", start, stop)
            end = base + nl + 1
            raw = view[start:nl]
            line = head = None
            n += 1
            if nl - start <= max_bytes and count < max_lines:
                try:
                    if not ascii_only:
                        str(raw, "utf-8")  # a UnicodeDecodeError: the precise path words it
                    line = decode_line(raw)
                    head = decode_head(line.body)
                except fast_errors:
                    line = None
            if (
                line is None
                or head is None
                or (head.stream is not None and head.stream is not False)
                or not add_id(line.custom_id)  # last: a line that gets here is committed
            ):
                self._line_no = n - 1
                s.lines, s.token_estimate = count, tokens
                self._line(bytes(raw), base + start, end)
                count, tokens = s.lines, s.token_estimate
                start = nl + 1
                continue
            count += 1
            shard = self._shard
            if shard and shard[2] < shard_lines and end - shard[0] <= SHARD_MAX_BYTES:
                shard[2] += 1  # _add_to_shard's common case, inline
                self._shard_end = end
            else:
                self._add_to_shard(base + start, end, n)
            url = line.url
            if url_entry is not None and url == last_url:  # _remember's common case, inline
                url_entry[0] += 1
                if len(url_entry) <= MAX_LINES_PER_KEY:
                    url_entry.append(n)
            else:
                canonical = urls.get(url)
                if canonical is None:
                    canonical = urls[url] = normalise_endpoint(url) or url
                self._remember(url_table, canonical, n)
                last_url, url_entry = url, url_table.get(canonical)
            model = head.model
            if model_entry is not None and model == last_model:
                model_entry[0] += 1
                if len(model_entry) <= MAX_LINES_PER_KEY:
                    model_entry.append(n)
            else:
                self._remember(model_table, model, n)
                last_model, model_entry = model, model_table.get(model)
            tokens += estimate_tokens(len(line.body), head)
            start = nl + 1
        s.lines, s.token_estimate = count, tokens
        self._line_no = n
        self._offset = base + stop

    def finish(self) -> FileSummary:
        self._at_start = False
        if self._dropped:
            self._too_long_line(self._dropped)
            self._dropped = 0
        elif self._tail:
            end = self._offset + len(self._tail)
            self._line(bytes(self._tail), self._offset, end)
            self._tail = bytearray()
        self._close_shard()
        s = self.summary
        if s.lines == 0 and s.jsonl_ok:
            self._issue("empty_file", "The input file has no requests.", None)
        if s.lines > self._max_lines:
            self._issue(
                "too_many_tasks",
                f"The input file has {s.lines} requests; the limit is {self._max_lines}.",
                None,
            )
        if len(s.models) > 1:
            first, *others = s.models
            for other in others:
                lines = s.models[other][1:]
                self._issue(
                    "model_mismatch",
                    f"All requests of a batch must use the same model: line {lines[0]} uses "
                    f"{other!r} where line {s.models[first][1]} uses {first!r}.",
                    lines[0],
                    "body.model",
                )
        return s

    def _close_shard(self) -> None:
        if self._shard:
            start, first, count = self._shard
            end = self._shard_end
            self.summary.shards.append(ShardSpan(start, end, first, count))
            self._shard = []

    def _add_to_shard(self, start: int, end: int, line_no: int) -> None:
        if self._shard and (
            self._shard[2] >= self._shard_lines or end - self._shard[0] > SHARD_MAX_BYTES
        ):
            self._close_shard()
        if not self._shard:
            self._shard = [start, line_no, 0]
        self._shard[2] += 1
        self._shard_end = end

    def _line(self, raw: bytes, start: int, end: int) -> None:  # noqa: C901 - a flat checklist
        self._line_no += 1
        n = self._line_no
        if len(raw) > self._max_line_bytes:
            self._not_jsonl(f"Line {n} is longer than {self._max_line_bytes} bytes.", n)
            return
        text = raw  # JSON allows the whitespace around a value: no copy to strip it
        if not text or text.isspace():
            return  # blank lines are allowed and skipped
        self.summary.lines += 1
        if self.summary.lines > self._max_lines:
            return  # counted for too_many_tasks; not checked further
        if not text.isascii():
            try:
                text.decode("utf-8")
            except UnicodeDecodeError as exc:
                self._not_jsonl(f"Line {n} is not valid UTF-8 (byte {exc.start + 1}).", n)
                return
        try:
            line = _line_decoder.decode(text)
        except msgspec.DecodeError as exc:
            self._not_jsonl(f"Line {n} is not valid JSON: {exc}.", n)
            return
        except msgspec.ValidationError:
            self._not_jsonl(f"Line {n} is not a JSON object.", n)
            return
        except RecursionError:
            self._not_jsonl(f"Line {n} is JSON nested too deeply.", n)
            return
        self._add_to_shard(start, end, n)
        cid, method, url = line.custom_id, line.method, line.url
        if msgspec.UNSET in (cid, method, url) or line.body is msgspec.UNSET:
            for name in ("custom_id", "method", "url", "body"):
                if getattr(line, name) is msgspec.UNSET:
                    self._issue(
                        "missing_required_parameter", f"Line {n} has no {name!r}.", n, name
                    )
        if cid is not msgspec.UNSET:
            if not isinstance(cid, str) or not cid:
                self._issue(
                    "invalid_request", f"Line {n}: custom_id must be a string.", n, "custom_id"
                )
            elif not self._custom_ids.add(cid):
                self._issue(
                    "duplicate_custom_id",
                    f"Line {n}: custom_id {cid!r} is used more than once.",
                    n,
                    "custom_id",
                )
        if method is not msgspec.UNSET and method != "POST":
            self._issue("invalid_request", f"Line {n}: method must be 'POST'.", n, "method")
        if url is not msgspec.UNSET:
            if not isinstance(url, str):
                self._issue("invalid_request", f"Line {n}: url must be a string.", n, "url")
            else:
                canonical = self._urls.get(url)
                if canonical is None:
                    canonical = self._urls[url] = normalise_endpoint(url) or url
                self._remember(self.summary.urls, canonical, n)
        if isinstance(line.body, msgspec.Raw):
            self._check_body(line.body, n)

    def _check_body(self, body: msgspec.Raw, n: int) -> None:
        try:
            loose = loose_head_decoder.decode(body)
        except DECODE_ERRORS:
            self._issue("invalid_request", f"Line {n}: body must be a JSON object.", n, "body")
            return
        if not (loose.stream is None or loose.stream is False):  # 0 == False: not a bool
            self._issue(
                "streaming_unsupported",
                f"Line {n}: streaming is not supported in a batch.",
                n,
                "body.stream",
            )
        if loose.model is None:
            self._issue(
                "missing_required_parameter", f"Line {n}: body has no 'model'.", n, "body.model"
            )
            return
        if not isinstance(loose.model, str) or not loose.model:
            self._issue(
                "invalid_request",
                f"Line {n}: body.model must be a non-empty string.",
                n,
                "body.model",
            )
            return
        self._remember(self.summary.models, loose.model, n)
        try:
            head = head_decoder.decode(body)
        except msgspec.ValidationError as exc:
            param, reason = issue_param(exc)
            self._issue("invalid_request", f"Line {n}: {param}: {reason}.", n, param)
            return
        self.summary.token_estimate += estimate_tokens(len(body), head)


def mismatched_lines(summary: FileSummary, endpoint: str) -> list[tuple[int, str]]:
    """Lines whose url is not the batch's endpoint, as (line, url), in line order."""
    found: list[tuple[int, str]] = []
    for url, entry in summary.urls.items():
        if url != endpoint:
            found.extend((line, url) for line in entry[1:])
    return sorted(found)[:MAX_ISSUES]
