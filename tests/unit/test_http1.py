"""The HTTP/1.1 upstream client against real servers on ports: the fake upstream, and small
raw asyncio servers for the edge cases (chunked, ``Connection: close``, idle connections
closed by the server, no answer at all, gzip)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd.backends.base import UpstreamTimeout, UpstreamUnavailable, parse_retry_after
from batchd.backends.http1 import HTTP1Backend
from tests.support import Upstream, free_port, start_upstream

CHAT = "/v1/chat/completions"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    up = start_upstream(tmp_path_factory.mktemp("http1"))
    try:
        yield up
    finally:
        up.proc.stop()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0].encode(), headers, body


class RawServer:
    """A raw asyncio server whose connections are served by ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, dict[str, str], bytes]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)  # type: ignore[arg-type]
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[RawServer, str]]]]:
    servers: list[RawServer] = []

    async def make(handler: Handler) -> tuple[RawServer, str]:
        s = RawServer(handler)
        servers.append(s)
        return s, await s.start()

    yield make
    for s in servers:
        await s.stop()


@contextlib.asynccontextmanager
async def _backend(url: str, **kw: Any) -> AsyncIterator[HTTP1Backend]:
    """An HTTP1Backend for the test's length, closed after it."""
    b = HTTP1Backend(url, **kw)
    try:
        yield b
    finally:
        await b.close()


def answer(body: bytes, *extra: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# -- against the fake upstream ----------------------------------------------------------------
async def test_fake_upstream_roundtrip_and_base_with_v1(upstream: Upstream) -> None:
    for base in (upstream.url, upstream.v1, upstream.v1 + "/"):
        async with _backend(base, api_key="sk-x", max_concurrency=4) as b:
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            r = await b.send(CHAT, body.encode(), time_limit=10)
            assert r.status_code == 200
            data = json.loads(r.body)
            assert data["choices"][0]["message"]["content"]
            assert r.request_id
            assert r.retry_after is None


async def test_fake_upstream_429_retry_after(upstream: Upstream) -> None:
    upstream.control(rate_limit_rate=1.0, retry_after=7)
    b = HTTP1Backend(upstream.v1, api_key=None, max_concurrency=2)
    try:
        r = await b.send(CHAT, b'{"model":"m","messages":[]}', time_limit=10)
        assert r.status_code == 429
        assert r.retry_after == 7.0
    finally:
        upstream.control(rate_limit_rate=0.0)
        await b.close()


async def test_fake_upstream_concurrency_capped_and_connections_reused(upstream: Upstream) -> None:
    upstream.reset()
    upstream.control(latency=0.05)
    b = HTTP1Backend(upstream.v1, api_key=None, max_concurrency=3)
    try:
        body = b'{"model":"m","messages":[{"role":"user","content":"x"}]}'
        rs = await asyncio.gather(*[b.send(CHAT, body, time_limit=10) for _ in range(30)])
        assert all(r.status_code == 200 for r in rs)
        stats = upstream.stats()
        assert stats["max_in_flight"] <= 3
        assert stats["requests"] == 30
        assert len(b._conns) <= 3
    finally:
        upstream.control(latency=0.0)
        await b.close()
    assert not b._conns


# -- edge cases against raw servers -----------------------------------------------------------
async def test_request_bytes_and_body_exact(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
) -> None:
    sent = b'{"model":"m","x":"\xc3\xa9 \\u0000 \\n"}'
    reply = b'{"a": 1,  "b": "\xe2\x82\xac"}\n'

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            server.requests.append(await read_request(reader))
            writer.write(answer(reply, "x-request-id: rid-1", "retry-after-ms: 1500"))
            await writer.drain()

    server, url = await raw(handler)
    async with _backend(url + "/prefix/v1", api_key="sk-k", max_concurrency=2) as b:
        r = await b.send("/v1/embeddings", sent, time_limit=5)
        r2 = await b.send("/v1/embeddings", sent, time_limit=5)
    assert r.body == reply and r2.body == reply
    assert r.request_id == "rid-1"
    assert r.retry_after == 1.5
    line, headers, body = server.requests[0]
    assert line == b"POST /prefix/v1/embeddings HTTP/1.1"
    assert body == sent
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == "Bearer sk-k"
    assert "api-key" not in headers  # the key is sent once, as the style says
    assert headers["user-agent"] == "batchd"
    assert server.connections == 1  # kept alive


@pytest.mark.parametrize(
    ("base", "style", "path", "auth"),
    [
        # Azure's classic deployment URL: no /v1, the api-version kept, the key as api-key
        (
            "/openai/deployments/gpt-4o?api-version=2024-10-21",
            "azure",
            b"/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            ("api-key", "sk-k"),
        ),
        # Azure's newer v1 base: /openai/v1 + /chat/completions
        ("/openai/v1", "azure", b"/openai/v1/chat/completions", ("api-key", "sk-k")),
        # an OpenAI-style server behind a gateway that needs a query parameter
        ("/v1?tenant=a&x=1", "openai", b"/v1/chat/completions?tenant=a&x=1",
         ("authorization", "Bearer sk-k")),
        ("/gw/", "openai", b"/gw/v1/chat/completions", ("authorization", "Bearer sk-k")),
    ],
)
async def test_upstream_url_styles_and_headers(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
    base: str,
    style: str,
    path: bytes,
    auth: tuple[str, str],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            server.requests.append(await read_request(reader))
            writer.write(answer(b"{}"))
            await writer.drain()

    server, url = await raw(handler)
    extra = {"x-team": "a", "Host": "evil"}  # a reserved header is never overridden
    async with _backend(
        url + base, api_key="sk-k", max_concurrency=1, api_style=style, headers=extra
    ) as b:
        r = await b.send(CHAT, b"{}", time_limit=5)
    assert r.status_code == 200
    line, headers, _ = server.requests[0]
    assert line == b"POST " + path + b" HTTP/1.1"
    assert headers[auth[0]] == auth[1]
    other = "authorization" if auth[0] == "api-key" else "api-key"
    assert other not in headers
    assert headers["x-team"] == "a"
    assert headers["host"] == f"127.0.0.1:{server.port}"


@pytest.mark.parametrize(
    ("base", "extra", "version"),
    [
        ("", {}, "2023-06-01"),  # Anthropic's own base URL: no /v1
        ("/v1", {"Anthropic-Version": "2024-10-22"}, "2024-10-22"),  # the deployment's own
    ],
)
async def test_anthropic_style_key_version_and_request_id(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
    base: str,
    extra: dict[str, str],
    version: str,
) -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            server.requests.append((head.split(b"\r\n")[0], {}, await reader.readexactly(length)))
            writer.write(answer(b"{}", "request-id: req_011"))
            await writer.drain()

    server, url = await raw(handler)
    async with _backend(
        url + base, api_key="sk-ant", max_concurrency=1, api_style="anthropic", headers=extra
    ) as b:
        r = await b.send("/v1/messages", b'{"model":"c"}', time_limit=5)
    assert r.request_id == "req_011"  # Anthropic names it request-id
    line, _, body = server.requests[0]
    assert line == b"POST /v1/messages HTTP/1.1" and body == b'{"model":"c"}'
    fields = [h.split(b":", 1) for h in heads[0].split(b"\r\n")[1:] if h]
    headers = [(k.strip().lower().decode(), v.strip().decode()) for k, v in fields]
    assert ("x-api-key", "sk-ant") in headers
    assert not {"authorization", "api-key"} & {k for k, _ in headers}
    # one version: batchd's default, or the one the deployment's headers name
    assert [v for k, v in headers if k == "anthropic-version"] == [version]


async def test_chunked_and_gzip(raw: Callable[..., Awaitable[tuple[RawServer, str]]]) -> None:
    payload = b'{"chunked": true, "pad": "' + b"z" * 5000 + b'"}'
    packed = gzip.compress(payload)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(payload), 1000):
            part = payload[i : i + 1000]
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(b"0\r\n\r\n")
        await read_request(reader)
        writer.write(answer(packed, "Content-Encoding: gzip", status="400 Bad Request"))
        await read_request(reader)

    server, url = await raw(handler)
    async with _backend(url, api_key=None, max_concurrency=1) as b:
        r = await b.send(CHAT, b"{}", time_limit=5)
        assert r.status_code == 200 and r.body == payload
        r = await b.send(CHAT, b"{}", time_limit=5)
        assert r.status_code == 400 and r.body == payload
    assert server.connections == 1


async def test_connection_close_and_http10(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if server.connections == 1:
            writer.write(answer(b"one", "Connection: close"))
        else:
            # HTTP/1.0 without a length: the body ends when the connection does.
            writer.write(b"HTTP/1.0 200 OK\r\n\r\ntwo")
        await writer.drain()

    server, url = await raw(handler)
    async with _backend(url, api_key=None, max_concurrency=1) as b:
        assert (await b.send(CHAT, b"{}", time_limit=5)).body == b"one"
        assert (await b.send(CHAT, b"{}", time_limit=5)).body == b"two"
        assert (await b.send(CHAT, b"{}", time_limit=5)).body == b"two"
    assert server.connections == 3


async def test_idle_connection_closed_by_server_is_retried_once(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"ok"))
        await writer.drain()
        await asyncio.sleep(0.05)  # then closed while idle (a keep-alive timeout)

    server, url = await raw(handler)
    async with _backend(url, api_key=None, max_concurrency=1) as b:
        assert (await b.send(CHAT, b"{}", time_limit=5)).body == b"ok"
        await asyncio.sleep(0.2)
        assert (await b.send(CHAT, b"{}", time_limit=5)).body == b"ok"
    assert server.connections == 2


async def test_idle_close_race_on_open_socket_is_retried(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
) -> None:
    """The server reads the next request and closes without a byte: retried once."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"ok"))
        await writer.drain()
        if server.connections == 1:
            await read_request(reader)  # then close without answering
        else:
            await read_request(reader)
            writer.write(answer(b"again"))
            await writer.drain()

    server, url = await raw(handler)
    async with _backend(url, api_key=None, max_concurrency=1) as b:
        assert (await b.send(CHAT, b"{}", time_limit=5)).body == b"ok"
        assert (await b.send(CHAT, b"{}", time_limit=5)).body == b"ok"
    assert server.connections == 2


async def test_fresh_connection_closed_without_answer_is_not_retried(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    server, url = await raw(handler)
    async with _backend(url, api_key=None, max_concurrency=1) as b:
        with pytest.raises(UpstreamUnavailable):
            await b.send(CHAT, b"{}", time_limit=5)
    assert server.connections == 1


async def test_no_retry_after_partial_answer(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"ok"))
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
        await writer.drain()

    server, url = await raw(handler)
    async with _backend(url, api_key=None, max_concurrency=1) as b:
        assert (await b.send(CHAT, b"{}", time_limit=5)).body == b"ok"
        with pytest.raises(UpstreamUnavailable):
            await b.send(CHAT, b"{}", time_limit=5)
    assert server.connections == 1
    assert not b._idle


async def test_no_answer_times_out(raw: Callable[..., Awaitable[tuple[RawServer, str]]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    _, url = await raw(handler)
    b = HTTP1Backend(url, api_key=None, max_concurrency=1)
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        with pytest.raises(UpstreamTimeout):
            await b.send(CHAT, b"{}", time_limit=0.3)
        assert 0.25 <= loop.time() - t0 < 2
    finally:
        await b.close()
    assert not b._idle and not b._conns


async def test_connection_refused() -> None:
    async with _backend(f"http://127.0.0.1:{free_port()}/v1", api_key=None, max_concurrency=1) as b:
        with pytest.raises(UpstreamUnavailable):
            await b.send(CHAT, b"{}", time_limit=5)


async def test_garbage_answer_is_unavailable(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    _, url = await raw(handler)
    async with _backend(url, api_key=None, max_concurrency=1) as b:
        with pytest.raises(UpstreamUnavailable):
            await b.send(CHAT, b"{}", time_limit=5)


async def test_pool_never_above_max_concurrency(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
) -> None:
    in_flight = 0
    most = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, most
        while True:
            await read_request(reader)
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            writer.write(answer(b"{}"))
            await writer.drain()

    server, url = await raw(handler)
    async with _backend(url, api_key=None, max_concurrency=4) as b:
        rs = await asyncio.gather(*[b.send(CHAT, b"{}", time_limit=10) for _ in range(40)])
    assert all(r.status_code == 200 for r in rs)
    assert most <= 4
    assert server.connections <= 4


async def test_cancelled_request_closes_its_connection(
    raw: Callable[..., Awaitable[tuple[RawServer, str]]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    _, url = await raw(handler)
    async with _backend(url, api_key=None, max_concurrency=1) as b:
        task = asyncio.ensure_future(b.send(CHAT, b"{}", time_limit=10))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not b._idle


def test_https_and_url_parsing() -> None:
    b = HTTP1Backend("https://api.example.com/openai/v1/", api_key=None, max_concurrency=1)
    assert b._ssl is not None and b._port == 443
    assert b._head(CHAT).startswith(b"POST /openai/v1/chat/completions HTTP/1.1\r\n")
    assert b"Host: api.example.com\r\n" in b._head(CHAT)
    b = HTTP1Backend("http://h:8000", api_key=None, max_concurrency=1)
    assert b._ssl is None
    assert b._head(CHAT).startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: h:8000\r\n")
    with pytest.raises(ValueError):
        HTTP1Backend("ftp://h", api_key=None, max_concurrency=1)


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line, _, body = await read_request(reader)
                seen.append(line + b" " + body)
                writer.write(answer(b"secure"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    b = HTTP1Backend(f"https://127.0.0.1:{port}/v1", api_key=None, max_concurrency=1)
    b._ssl = ssl.create_default_context(cafile=str(cert))  # trust the test certificate
    try:
        assert (await b.send(CHAT, b"{}", time_limit=10)).body == b"secure"
        assert (await b.send(CHAT, b"{}", time_limit=10)).body == b"secure"
    finally:
        await b.close()
        server.close()
        await server.wait_closed()
    assert seen == [b"POST /v1/chat/completions HTTP/1.1 {}"] * 2


def test_under_uvloop(upstream: Upstream) -> None:
    """The engine's processes run on uvloop, whose transports are not asyncio's classes."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with _backend(upstream.v1, api_key=None, max_concurrency=2) as b:
            body = b'{"model":"m","messages":[{"role":"user","content":"uv"}]}'
            rs = await asyncio.gather(*[b.send(CHAT, body, time_limit=10) for _ in range(6)])
            assert all(r.status_code == 200 for r in rs)
            assert len(b._conns) <= 2
        with pytest.raises(UpstreamUnavailable):
            refused = HTTP1Backend(
                f"http://127.0.0.1:{free_port()}", api_key=None, max_concurrency=1
            )
            await refused.send(CHAT, b"{}", time_limit=5)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 30))
