"""Upstream answers are bounded: ``max_response_bytes`` as received and once gzip is undone
(issue 10). Raw asyncio servers on ports play the hostile upstream."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from batchd.backends.base import UpstreamUnavailable
from batchd.backends.http1 import UpstreamTooLarge
from tests.unit.test_http1 import RawServer, _backend, answer, read_request

CHAT = "/v1/chat/completions"
CAP = 64 * 1024
Raw = Callable[..., Awaitable[tuple[RawServer, str]]]


@pytest.fixture
async def raw() -> AsyncIterator[Raw]:
    servers: list[RawServer] = []

    async def make(handler: Callable[..., Awaitable[None]]) -> tuple[RawServer, str]:
        s = RawServer(handler)
        servers.append(s)
        return s, await s.start()

    yield make
    for s in servers:
        await s.stop()


def serve(body: bytes, *headers: str) -> Callable[..., Awaitable[None]]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(answer(body, *headers))
            await writer.drain()

    return handler


async def send(url: str) -> bytes:
    async with _backend(url, api_key=None, max_concurrency=2, max_response_bytes=CAP) as b:
        r = await b.send(CHAT, b"{}", time_limit=10)
        return r.body


async def test_at_the_cap_is_kept(raw: Raw) -> None:
    _, url = await raw(serve(b"x" * CAP))
    assert await send(url) == b"x" * CAP


async def test_larger_than_the_cap(raw: Raw) -> None:
    _, url = await raw(serve(b"x" * (CAP + 1)))
    with pytest.raises(UpstreamTooLarge) as exc:
        await send(url)
    assert f"larger than {CAP} bytes as received" in str(exc.value)
    assert "max_response_bytes" in str(exc.value)


async def test_chunked_without_end(raw: Raw) -> None:
    """A chunked answer that never ends is cut at the cap, not read until memory runs out."""
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"y" * 8192
        for _ in range(10_000):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()

    server, url = await raw(endless)
    with pytest.raises(UpstreamTooLarge):
        await send(url)
    assert server.connections == 1


async def test_gzip_bomb(raw: Raw) -> None:
    bomb = gzip.compress(b"\0" * (50 * 1024 * 1024))  # ~50 KB that inflates to 50 MB
    assert len(bomb) < CAP
    _, url = await raw(serve(bomb, "Content-Encoding: gzip"))
    with pytest.raises(UpstreamTooLarge) as exc:
        await send(url)
    assert "once decompressed" in str(exc.value)


async def test_gzip_within_the_cap_and_truncated(raw: Raw) -> None:
    payload = b'{"ok": true}' * 1000
    _, url = await raw(serve(gzip.compress(payload), "Content-Encoding: gzip"))
    assert await send(url) == payload
    packed = zlib.compress(payload)  # not gzip framing
    _, url = await raw(serve(gzip.compress(payload)[:-12], "Content-Encoding: gzip"))
    with pytest.raises(UpstreamUnavailable) as exc:
        await send(url)
    assert "truncated" in str(exc.value)
    _, url = await raw(serve(packed, "Content-Encoding: gzip"))
    with pytest.raises(UpstreamUnavailable):
        await send(url)
