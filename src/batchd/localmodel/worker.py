"""A dedicated thread that loads a model on its first job and serves jobs from any thread.

The asyncio loop only appends to a queue under a lock; loading and every numpy step run on
this thread (numpy's BLAS releases the GIL, so the loop stays responsive). Subclasses decide
how jobs are batched: :class:`batchd.localmodel.scheduler.GenerationScheduler` (continuous
batching) and :class:`batchd.localmodel.minilm.EmbeddingWorker`.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

M = TypeVar("M")
J = TypeVar("J")


_blas_limit = 0  # the largest limit set so far in this process


def limit_blas_threads(threads: int | None) -> None:
    """Set how many threads numpy's BLAS uses, process-wide (``None``: leave it). The limit
    is shared by every local model of the process, so the largest one asked for applies.

    OpenBLAS starts one thread per core. When anything else keeps a core busy (the engine,
    the API, another process), its threads wait on each other: with one core kept busy, a
    batch of 32 chat requests ran at 72 tokens/s with two threads and 142 with one, on 2
    cores (on an idle machine two threads gave 241). The model's thread is the only heavy
    numpy user in batchd. (threadpoolctl only sees libraries already loaded: numpy is, by
    the imports of this package.)"""
    global _blas_limit
    if threads is None or threads <= _blas_limit:
        return
    try:  # untyped, and optional: without it, numpy's default (or OPENBLAS_NUM_THREADS)
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError:
        return
    threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
    _blas_limit = threads


class WorkerClosed(RuntimeError):
    """The worker was closed before the job finished."""


class ModelWorker(abc.ABC, Generic[M, J]):
    def __init__(self, name: str, load: Callable[[], M]) -> None:
        self._name = name
        self._load = load
        self._cond = threading.Condition()
        self._pending: deque[J] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.model: M | None = None

    def submit(self, job: J) -> None:
        """Queue ``job``; starts the thread (and so the model load) on the first call."""
        with self._cond:
            if self._closed:
                raise WorkerClosed(f"{self._name} is closed")
            self._pending.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the thread after its current step; unfinished jobs fail with WorkerClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._busy() and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                new = list(self._pending)
                self._pending.clear()
            if self.model is None:
                try:
                    self.model = self._load()
                except Exception as exc:
                    for job in new:
                        self._fail(job, exc)
                    continue
            self._accept(new)
            try:
                self._step(self.model)
            except Exception as exc:  # a bug must not kill the thread: fail what was running
                self._abort(exc)
        with self._cond:
            leftover = list(self._pending)
            self._pending.clear()
        closed = WorkerClosed(f"{self._name} was closed")
        for job in leftover:
            self._fail(job, closed)
        self._abort(closed)
        self.model = None

    @abc.abstractmethod
    def _busy(self) -> bool:
        """Whether accepted jobs are still running (then the thread does not wait)."""

    @abc.abstractmethod
    def _accept(self, jobs: list[J]) -> None:
        """Take newly submitted jobs."""

    @abc.abstractmethod
    def _step(self, model: M) -> None:
        """Do one unit of work on the accepted jobs."""

    @abc.abstractmethod
    def _fail(self, job: J, exc: BaseException) -> None:
        """Finish ``job`` with an error."""

    @abc.abstractmethod
    def _abort(self, exc: BaseException) -> None:
        """Fail every accepted job and forget them."""


class CancellableJob(Protocol):
    """A job a worker skips once ``cancelled`` is set."""

    cancelled: bool


async def run_job(
    submit: Callable[[Callable[[Any], None]], CancellableJob], time_limit: float
) -> Any:
    """Submit a job to a worker thread and await what it delivers: ``submit(deliver)`` queues
    the job and returns it; the worker calls ``deliver`` (on its thread) with the result or
    an exception, which is raised here. Raises TimeoutError after ``time_limit`` seconds;
    the job is marked cancelled on timeout and when the caller is cancelled."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def deliver(result: Any) -> None:
        loop.call_soon_threadsafe(_resolve, future, result)

    job = submit(deliver)
    try:
        async with asyncio.timeout(time_limit):
            return await future
    except (TimeoutError, asyncio.CancelledError):
        job.cancelled = True
        raise


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
