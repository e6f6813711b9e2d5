from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import AzureOpenAI, OpenAI

from tests.support import Server, Upstream, start_server, start_upstream, write_config

API_KEY = "sk-test-a"
OTHER_KEY = "sk-test-b"


@pytest.fixture(scope="module")
def shared_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    up = start_upstream(tmp_path_factory.mktemp("upstream"))
    yield up
    up.proc.stop()


@pytest.fixture
def upstream(shared_upstream: Upstream) -> Upstream:
    """The module's fake upstream, with its switches and counters reset for each test."""
    shared_upstream.control(
        latency=0.0,
        fail_rate=0.0,
        rate_limit_rate=0.0,
        retry_after=0.05,
        reject_content=None,
        replies={},
        misbehave={},
    )
    shared_upstream.reset()
    return shared_upstream


def base_config(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "auth": {"keys": {API_KEY: "team-a", OTHER_KEY: "team-b"}},
        "deployments": [
            {
                "model": "gpt-4o",
                "backend": "openai",
                "base_url": upstream.v1,
                "max_concurrency": 32,
            },
            {"model": "text-embedding-3-small", "backend": "openai", "base_url": upstream.v1},
        ],
        "limits": {"completion_windows": ["24h", "5s", "30s"]},
        "engine": {
            "lease_seconds": 3.0,
            "checkpoint_seconds": 0.2,
            "cancel_grace_seconds": 2.0,
            "poll_seconds": 0.1,
        },
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def make(config: dict[str, Any], name: str = "batchd.toml") -> Server:
        path = write_config(tmp_path, config, name)
        server = start_server(path, tmp_path)
        started.append(server)
        return server

    yield make
    for s in started:
        for w in s.workers:
            w.stop()
        s.proc.stop()


@pytest.fixture(scope="module")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, shared_upstream: Upstream
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    server = start_server(write_config(tmp, base_config(shared_upstream)), tmp)
    yield server
    server.proc.stop()


@pytest.fixture
def server(shared_server: Server, upstream: Upstream) -> Server:
    """The module's server (its upstream reset for the test)."""
    return shared_server


@pytest.fixture
def sdk() -> Iterator[Callable[..., OpenAI]]:
    """Make OpenAI clients for a server; all are closed after the test."""
    made: list[OpenAI] = []

    def make(server: Server, key: str = API_KEY, path: str = "/v1", retries: int = 0) -> OpenAI:
        c = OpenAI(base_url=server.url + path, api_key=key, max_retries=retries)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def client(server: Server, sdk: Callable[..., OpenAI]) -> OpenAI:
    return sdk(server)


@pytest.fixture
def azure(server: Server) -> Iterator[AzureOpenAI]:
    c = AzureOpenAI(
        azure_endpoint=server.url, api_key=API_KEY, api_version="2024-07-01-preview", max_retries=0
    )
    yield c
    c.close()
