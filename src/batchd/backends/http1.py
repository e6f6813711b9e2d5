"""A lean HTTP/1.1 keep-alive client for an OpenAI-compatible upstream.

One pool of persistent connections per deployment (at most ``max_concurrency``, reused last
in, first out), each an :class:`asyncio.Protocol` that feeds ``httptools``' response parser.
It does only what the engine needs: ``POST`` a JSON body and return the status, the body
exactly as received (gzip undone if the server compressed it anyway) and three headers.
Per request that is one ``write``, one timer and one future, where a general-purpose client
builds request and response objects, header multidicts, URL objects and timer contexts.

Timeouts: connecting may take at most :data:`CONNECT_TIMEOUT`; the whole request at most its
``time_limit``. A timeout closes the connection and raises :class:`UpstreamTimeout`; a refused,
reset or broken connection raises :class:`UpstreamUnavailable`. A request on a reused
connection that fails before any byte of the answer arrived (the server closed the idle
connection) is sent once more on a fresh connection; never after part of an answer arrived.

Size: an answer's body may be at most ``max_response_bytes`` as received and again once gzip
is undone (a small compressed body can inflate a thousandfold); past either, the connection
is closed and :class:`UpstreamTooLarge` raised, naming the limit.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import ssl
import zlib
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

from batchd.backends.base import (
    Backend,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnavailable,
    retry_after_seconds,
)
from batchd.fifo_slots import FifoSlots

CONNECT_TIMEOUT = 10.0
ANTHROPIC_VERSION = "2023-06-01"  # what api_style = "anthropic" sends unless headers say
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # the default of ``deployments.max_response_bytes``
CLOSE_WAIT = 2.0  # seconds close() waits for connections to finish closing before aborting

# Headers kept from an answer (names as llhttp hands them over, lower-cased here).
_KEEP = frozenset(
    (
        b"x-request-id",
        b"apim-request-id",
        b"request-id",  # Anthropic's
        b"retry-after",
        b"retry-after-ms",
        b"content-encoding",
        b"content-length",
        b"transfer-encoding",
    )
)
# The usual spellings, looked up as sent (no ``lower()`` a header): the name kept, or b"" for
# a header that is not needed. Anything else is lower-cased and checked against ``_KEEP``.
_SPELLINGS: dict[bytes, bytes] = {}
for _name in _KEEP:
    _title = b"-".join(w.capitalize() for w in _name.split(b"-"))
    for _spelling in (_name, _title, _name.upper()):
        _SPELLINGS[_spelling] = _name
_SPELLINGS[b"X-Request-ID"] = b"x-request-id"
for _name in (b"date", b"server", b"content-type", b"connection", b"keep-alive", b"vary"):
    _title = b"-".join(w.capitalize() for w in _name.split(b"-"))
    _SPELLINGS[_name] = _SPELLINGS[_title] = b""

# Answers without a request id get a unique one: a random prefix per process and a counter.
_REQ_PREFIX = "req_" + os.urandom(8).hex()
_req_counter = itertools.count(1)


class _NoAnswer(Exception):
    """The connection failed before any byte of the answer arrived."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight on it."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_bytes: int = MAX_RESPONSE_BYTES
    ) -> None:
        self._loop = loop
        self._max_bytes = max_bytes
        self._body_bytes = 0
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost: asyncio.Future[None] = loop.create_future()
        self.keep_alive = False
        self._waiter: asyncio.Future[None] | None = None
        self._got_bytes = False
        self._headers_done = False
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not derive from asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for: the connection's state is unknown, so it is not reused.
            self.abort()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamUnavailable("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnavailable(f"invalid HTTP answer from upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep_alive = False
        if not self.lost.done():
            self.lost.set_result(None)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._eof_ends_body():
            waiter.set_result(None)
        elif not self._got_bytes:
            waiter.set_exception(_NoAnswer(str(exc or "connection closed by upstream")))
        else:
            reason = exc or "connection closed by upstream during the answer"
            waiter.set_exception(UpstreamUnavailable(f"upstream connection failed: {reason}"))

    # -- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._waiter is None or self._waiter.done():
            # A second answer to one request: stop parsing before it overwrites the first.
            raise _NoAnswer("unexpected answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        kept = _SPELLINGS.get(name)
        if kept is None:
            kept = name.lower()
            if kept not in _KEEP:
                return
        elif not kept:
            return
        self.headers[kept] = value

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._max_bytes:
            self._fail(UpstreamTooLarge(self._max_bytes, "as received"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim answer: the real one follows
            self._reset_answer()
            return
        self.keep_alive = self._parser.should_keep_alive()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the client's side --------------------------------------------------------------------
    def _eof_ends_body(self) -> bool:
        """An answer with neither ``content-length`` nor chunked encoding ends at EOF."""
        return (
            self._headers_done
            and b"content-length" not in self.headers
            and b"chunked" not in self.headers.get(b"transfer-encoding", b"").lower()
        )

    def _reset_answer(self) -> None:
        self._got_bytes = False
        self._headers_done = False
        self.status = 0
        self.headers = {}
        self._body = []
        self._body_bytes = 0

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.abort()

    def timed_out(self) -> None:
        self._fail(UpstreamTimeout("upstream timed out"))

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def start(self, data: bytes) -> asyncio.Future[None]:
        """Send one request; the future completes when its whole answer has arrived."""
        self._reset_answer()
        self.keep_alive = False
        waiter = self._loop.create_future()
        self._waiter = waiter
        assert self.transport is not None
        if self.closed or self.transport.is_closing():
            waiter.set_exception(_NoAnswer("connection closed"))
        else:
            self.transport.write(data)
        return waiter

    def body(self) -> bytes:
        data = b"".join(self._body)
        self._body = []
        encoding = self.headers.get(b"content-encoding")
        if encoding is not None and encoding.strip().lower() == b"gzip":
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                data = inflate.decompress(data, self._max_bytes + 1)
            except zlib.error as exc:
                raise UpstreamUnavailable(f"invalid gzip body from upstream: {exc}") from exc
            if len(data) > self._max_bytes or inflate.unconsumed_tail:
                raise UpstreamTooLarge(self._max_bytes, "once decompressed")
            if not inflate.eof:
                raise UpstreamUnavailable("invalid gzip body from upstream: truncated stream")
        return data


class HTTP1Backend(Backend):
    """An OpenAI-compatible HTTP upstream (vLLM, SGLang, llama.cpp, Ollama, TGI, OpenAI, Azure),
    or one that speaks Anthropic's ``/v1/messages`` (``api_style="anthropic"``)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        max_concurrency: int,
        api_style: str = "openai",
        headers: Mapping[str, str] | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        """``base_url``: ``http(s)://host[:port][/path][?query]``; the request path is the
        base path plus the endpoint (``/v1/chat/completions``, without its ``/v1`` when the
        base path ends in ``/v1`` or with ``api_style="azure"``), and the query string is
        kept (Azure's ``?api-version=``). The key is sent once: ``Authorization: Bearer``,
        ``api-key`` with ``api_style="azure"``, or ``x-api-key`` with ``api_style="anthropic"``
        (which also sends ``anthropic-version:`` :data:`ANTHROPIC_VERSION` unless ``headers``
        name one). ``headers`` go on every request. An answer larger than
        ``max_response_bytes`` raises :class:`UpstreamTooLarge`."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported upstream URL {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        # Paths are canonical /v1/...; a base_url that already ends in /v1 takes the rest.
        self._prefix = parts.path.rstrip("/")
        self._strip_v1 = self._prefix.endswith("/v1") or api_style == "azure"
        self._query = "?" + parts.query if parts.query else ""
        default_port = 443 if self._ssl is not None else 80
        host = self._host if ":" not in self._host else f"[{self._host}]"
        host_header = host if self._port == default_port else f"{host}:{self._port}"
        fixed = [
            f"Host: {host_header}",
            "User-Agent: batchd",
            "Content-Type: application/json",
        ]
        if api_key:
            if api_style == "azure":
                fixed.append(f"api-key: {api_key}")
            elif api_style == "anthropic":
                fixed.append(f"x-api-key: {api_key}")
            else:
                fixed.append(f"Authorization: Bearer {api_key}")
        named = {k.lower() for k in headers or {}}
        if api_style == "anthropic" and "anthropic-version" not in named:
            fixed.append(f"anthropic-version: {ANTHROPIC_VERSION}")
        reserved = {"host", "content-length", "content-type", "transfer-encoding", "connection"}
        fixed += [f"{k}: {v}" for k, v in (headers or {}).items() if k.lower() not in reserved]
        self._fixed = ("\r\n".join(fixed) + "\r\nContent-Length: ").encode("latin-1")
        self._heads: dict[str, bytes] = {}
        self._slots = FifoSlots(max_concurrency)  # at most ``max_concurrency`` at once
        self._max_response = max_response_bytes
        self._idle: list[_Conn] = []  # LIFO: the most recently used connection is reused first
        self._conns: set[_Conn] = set()

    def _head(self, endpoint: str) -> bytes:
        head = self._heads.get(endpoint)
        if head is None:
            path = self._prefix + (endpoint[3:] if self._strip_v1 else endpoint) + self._query
            head = b"POST " + path.encode("latin-1") + b" HTTP/1.1\r\n" + self._fixed
            self._heads[endpoint] = head
        return head

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Conn:
        limit = min(CONNECT_TIMEOUT, deadline - loop.time())
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Conn(loop, self._max_response),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"connecting to the upstream timed out after {limit:.0f}s"
            ) from exc
        except OSError as exc:
            raise UpstreamUnavailable(f"upstream connection failed: {exc}") from exc
        self._conns.add(conn)
        conn.lost.add_done_callback(lambda _: self._conns.discard(conn))
        return conn

    def _idle_conn(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def send(self, endpoint: str, body: bytes, *, time_limit: float) -> UpstreamResponse:
        # One coroutine for the whole exchange: a request is one ``write``, one timer and one
        # future, and its answer wakes this frame only.
        data = b"%s%d\r\n\r\n%s" % (
            self._heads.get(endpoint) or self._head(endpoint),
            len(body),
            body,
        )
        slots = self._slots
        if not slots.try_take():
            await slots.take()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + time_limit
            conn = self._idle_conn()
            fresh = conn is None
            while True:
                if conn is None:
                    conn = await self._connect(loop, deadline)
                waiter = conn.start(data)
                timer = loop.call_at(deadline, conn.timed_out)
                try:
                    await waiter
                except _NoAnswer as exc:
                    conn.abort()
                    if fresh:
                        raise UpstreamUnavailable(f"upstream connection failed: {exc}") from exc
                    # The server closed the idle connection: once more on a fresh one.
                    conn, fresh = None, True
                    continue
                except BaseException:
                    conn.abort()
                    raise
                finally:
                    timer.cancel()
                break
            status, headers = conn.status, conn.headers
            try:
                payload = conn.body()
            finally:
                if conn.keep_alive and not conn.closed:
                    self._idle.append(conn)
                else:
                    conn.abort()
        finally:
            slots.give_back()
        request_id = (
            headers.get(b"x-request-id")
            or headers.get(b"apim-request-id")
            or headers.get(b"request-id")  # Anthropic's
        )
        retry_after = None
        if b"retry-after" in headers or b"retry-after-ms" in headers:
            retry_ms = headers.get(b"retry-after-ms")
            retry = headers.get(b"retry-after")
            retry_after = retry_after_seconds(
                retry_ms.decode("latin-1") if retry_ms is not None else None,
                retry.decode("latin-1") if retry is not None else None,
            )
        return UpstreamResponse(
            status,
            payload,
            request_id.decode("latin-1")
            if request_id
            else f"{_REQ_PREFIX}{next(_req_counter):016x}",
            retry_after,
        )

    async def close(self) -> None:
        self._idle.clear()
        conns = list(self._conns)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        if not conns:
            return
        _, pending = await asyncio.wait([c.lost for c in conns], timeout=CLOSE_WAIT)
        for conn in conns:
            if conn.lost in pending:
                conn.abort()
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_WAIT)
