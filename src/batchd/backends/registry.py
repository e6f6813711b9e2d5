"""Backends for the configured deployments, built once per engine."""

from __future__ import annotations

import os

from batchd.backends.base import Backend
from batchd.backends.http1 import HTTP1Backend
from batchd.config import MODERATION_LOCAL_MODEL, Deployment


def build_backend(deployment: Deployment) -> Backend:
    if deployment.backend == "local" and deployment.local_model == MODERATION_LOCAL_MODEL:
        from batchd.backends.moderation import LocalModerationBackend

        return LocalModerationBackend(
            deployment.local_model, blas_threads=deployment.threads or os.cpu_count() or 1
        )
    if deployment.backend == "local":
        # Imported here: a server that only proxies never loads the model code.
        from batchd.backends.local import LocalBackend

        # One sequence per request in flight, up to what the model's batch step is sized for.
        return LocalBackend(
            deployment.local_model or deployment.model,
            max_batch=min(32, deployment.concurrency_limit),
            blas_threads=deployment.threads or os.cpu_count() or 1,
        )
    assert deployment.base_url is not None  # checked by the config
    return HTTP1Backend(
        deployment.base_url,
        api_key=deployment.api_key,
        max_concurrency=deployment.concurrency_limit,
        api_style=deployment.api_style,
        headers=deployment.headers,
        max_response_bytes=deployment.max_response_bytes,
    )
