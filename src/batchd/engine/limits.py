"""Per-deployment limits on what is sent upstream: requests in flight, per minute, tokens
per minute. One :class:`DeploymentLimiter` per deployment per process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiolimiter import AsyncLimiter

from batchd.config import Deployment


class DeploymentLimiter:
    def __init__(self, deployment: Deployment) -> None:
        import asyncio

        self.max_concurrency = deployment.max_concurrency
        self._slots = asyncio.Semaphore(deployment.max_concurrency)
        self._rpm = AsyncLimiter(deployment.rpm, 60) if deployment.rpm else None
        self._tpm = AsyncLimiter(deployment.tpm, 60) if deployment.tpm else None
        self._tpm_max = deployment.tpm

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        """Hold one in-flight slot for the length of one attempt."""
        async with self._slots:
            if self._rpm is not None:
                await self._rpm.acquire()
            if self._tpm is not None and tokens > 0:
                await self._tpm.acquire(min(tokens, self._tpm_max))
            yield
