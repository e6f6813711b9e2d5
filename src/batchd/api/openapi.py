"""The OpenAPI document served at ``/openapi.json``: every status each route can answer.

Handlers return responses they build themselves, so FastAPI knows neither their bodies nor
their errors; each route declares them here (:func:`responses`). The document then lists
the 400/401/404/408/409/413/416 a route sends, each with the OpenAI error envelope, the
206 of a ranged download, the query constraints, and the two ways to send a key
(``Authorization: Bearer``, ``api-key``) as security schemes. FastAPI's 422 (and its
``HTTPValidationError`` schema) is removed: batchd answers a bad parameter with a 400.
The schemathesis test in ``tests/contract/test_fuzz_api.py`` checks the served answers
against this document.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    """OpenAI's error envelope, the body of every 4xx and 5xx."""

    error: ErrorDetail


class FileObject(_Open):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None


class FileList(_Open):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(_Open):
    id: str
    object: Literal["file"]
    deleted: bool


class RequestCounts(_Open):
    total: int
    completed: int
    failed: int


class BatchObject(_Open):
    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(_Open):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class UsageRow(_Open):
    object: Literal["usage"]
    project: str
    model: str
    enqueued_tokens: int
    input_tokens: int
    output_tokens: int
    unfinished_batches: int


class UsageList(_Open):
    """``GET /v1/usage`` (an extension): the caller's project's tokens per deployment."""

    object: Literal["list"]
    data: list[UsageRow]


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """Anthropic's error envelope, the body of every error on ``/v1/messages/batches``."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class MessageBatchCounts(_Open):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class MessageBatchObject(_Open):
    id: str
    type: Literal["message_batch"]
    processing_status: Literal["in_progress", "canceling", "ended"]
    request_counts: MessageBatchCounts
    created_at: str
    ended_at: str | None
    expires_at: str
    cancel_initiated_at: str | None
    archived_at: str | None
    results_url: str | None


class MessageBatchList(_Open):
    data: list[MessageBatchObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class DeletedMessageBatch(_Open):
    id: str
    type: Literal["message_batch_deleted"]


_WHY = {
    400: "Invalid request: a parameter, the body or its content type",
    401: "No API key, or an unknown one",
    404: "No such object in this project",
    408: "The request body stopped arriving (limits.body_timeout_seconds)",
    409: "Conflict with the object's state",
    413: "The body is larger than the limit",
    416: "Range not satisfiable",
}


def responses(
    ok: type[BaseModel] | None, *statuses: int, ok_content: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route: its 200 body and each error status with the envelope."""
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": "OK"}
    elif ok_content is not None:
        out[200] = {"description": "OK", "content": ok_content}
    for status in (401, *statuses):
        out[status] = {"model": Error, "description": _WHY[status]}
    return out


def anthropic_responses(
    ok: type[BaseModel] | None, *statuses: int, ok_content: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    """:func:`responses` for the Message Batches routes: errors in Anthropic's envelope."""
    out = responses(ok, *statuses, ok_content=ok_content)
    for status in (401, *statuses):
        out[status]["model"] = AnthropicError
    return out


def _finish(schema: dict[str, Any]) -> dict[str, Any]:
    for path in schema.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


def install(app: FastAPI) -> None:
    """Finish the document FastAPI builds (once, on first request). Install before
    :func:`batchd.api.docs.install`, which copies the finished ``/v1`` operations to the
    Azure trees and declares the two key headers as security schemes."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _finish(plain())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
