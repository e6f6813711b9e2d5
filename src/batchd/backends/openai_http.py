"""An OpenAI-compatible HTTP upstream (vLLM, SGLang, llama.cpp, Ollama, TGI, OpenAI, Azure).

One aiohttp session per deployment with a connector sized to its ``max_concurrency``;
explicit connect and read timeouts. The answer's body is returned as the bytes received.
"""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
from yarl import URL

from batchd.backends.base import (
    Backend,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    retry_after_seconds,
)

CONNECT_TIMEOUT = 10.0


class OpenAIHTTPBackend(Backend):
    def __init__(self, base_url: str, *, api_key: str | None, max_concurrency: int) -> None:
        self._base = base_url.rstrip("/")
        # Paths are canonical /v1/...; a base_url that already ends in /v1 takes the rest.
        self._strip_v1 = self._base.endswith("/v1")
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
            self._headers["api-key"] = api_key
        self._max = max_concurrency
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _url(self, endpoint: str) -> URL:
        # Parsed once per endpoint: aiohttp would otherwise parse the string per request.
        url = self._urls.get(endpoint)
        if url is None:
            url = URL(self._base + (endpoint[3:] if self._strip_v1 else endpoint))
            self._urls[endpoint] = url
        return url

    def _timeout(self, time_limit: float) -> aiohttp.ClientTimeout:
        # The same limit comes back for nearly every request: reuse its timeout object.
        cached = self._timeouts.get(time_limit)
        if cached is None:
            # No sock_read: ``total`` always fires first, and a sock_read timer is moved on
            # every chunk received.
            cached = aiohttp.ClientTimeout(
                total=time_limit, connect=min(CONNECT_TIMEOUT, time_limit)
            )
            if len(self._timeouts) > 64:
                self._timeouts.clear()
            self._timeouts[time_limit] = cached
        return cached

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max, limit_per_host=self._max, keepalive_timeout=60
            )
            # No cookie jar: model servers do not need cookies, and the jar is consulted on
            # every request and every answer.
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                auto_decompress=True,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def send(self, endpoint: str, body: bytes, *, time_limit: float) -> UpstreamResponse:
        session = self._get_session()
        t = self._timeout(time_limit)
        try:
            async with session.post(self._url(endpoint), data=body, timeout=t) as resp:
                data = await resp.read()
                retry_after = retry_after_seconds(
                    resp.headers.get("retry-after-ms"), resp.headers.get("retry-after")
                )
                request_id = (
                    resp.headers.get("x-request-id")
                    or resp.headers.get("apim-request-id")
                    or f"req_{uuid.uuid4().hex}"
                )
                return UpstreamResponse(resp.status, data, request_id, retry_after)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream timed out after {time_limit:.0f}s") from exc
        except asyncio.TimeoutError as exc:  # noqa: UP041 - aiohttp may raise either name
            raise UpstreamTimeout(f"upstream timed out after {time_limit:.0f}s") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream connection failed: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
