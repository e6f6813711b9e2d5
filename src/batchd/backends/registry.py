"""Backends for the configured deployments, built once per engine."""

from __future__ import annotations

from batchd.backends.base import Backend
from batchd.backends.openai_http import OpenAIHTTPBackend
from batchd.config import Deployment


def build_backend(deployment: Deployment) -> Backend:
    if deployment.backend == "local":
        # Imported here: a server that only proxies never loads the model code.
        from batchd.backends.local import LocalBackend

        return LocalBackend(deployment.local_model or deployment.model)
    assert deployment.base_url is not None  # checked by the config
    return OpenAIHTTPBackend(
        deployment.base_url,
        api_key=deployment.api_key,
        max_concurrency=deployment.max_concurrency,
    )
