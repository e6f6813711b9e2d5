"""The Files and Batches routes, mounted under ``/v1``, ``/openai`` and ``/openai/v1``.

A handler parses, calls the service once, serialises. ``api-version`` is accepted on every
route and otherwise ignored. Every ``GET`` route answers ``HEAD`` too (RFC 9110 §9.3.2:
the same headers, no body). Every parameter is bounded and typed before use: query
parameters by their declared constraints (a violation is a 400 naming it), bodies by
``api/jsonbody.py`` and ``api/upload.py``, ``Range`` by ``api/ranges.py``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import Response, StreamingResponse

from batchd.api.auth import Authenticator
from batchd.api.errors import error_response
from batchd.api.jsonbody import content_length, read_json
from batchd.api.openapi import (
    BatchList,
    BatchObject,
    FileDeleted,
    FileList,
    FileObject,
    UsageList,
    responses,
)
from batchd.api.ranges import parse_range
from batchd.api.readiness import Readiness
from batchd.api.upload import FORM_OVERHEAD, read_form
from batchd.errors import InvalidRequest, RangeNotSatisfiable, TooLarge
from batchd.models import API_AZURE, API_OPENAI
from batchd.service.batches import BatchService
from batchd.service.files import FileService
from batchd.service.idempotency import HEADER, Idempotency, check_key, fingerprint
from batchd.service.results import ResultService, cursor_of
from batchd.store.protocols import UsageStore

# ``after`` cursors: an id of the listed kind (or empty: from the start)
_AFTER_BATCH = r"^(batch_[0-9a-f-]{36})?$"
_AFTER_FILE = r"^(file-[0-9a-f-]{36})?$"
_SECONDS = re.compile(r"[0-9]{1,10}", re.ASCII)
GET = ["GET", "HEAD"]


@dataclass
class Services:
    files: FileService
    batches: BatchService
    auth: Authenticator
    max_upload_bytes: int
    readiness: Readiness
    wake_engine: Callable[[], None]
    idempotency: Idempotency
    usage: UsageStore  # /usage: the one store aggregate a route reads itself
    results: ResultService


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers
    )


def api_of(request: Request) -> str:
    """The API a request came through: Azure's ``/openai`` tree, or OpenAI's (``/v1`` and
    Azure's newer ``/openai/v1``, which follows OpenAI's behaviour)."""
    path = request.url.path
    if path.startswith("/openai/") and not path.startswith("/openai/v1/"):
        return API_AZURE
    return API_OPENAI


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def project(
    request: Request,
    authorization: str | None = Header(default=None, include_in_schema=False),
    api_key: str | None = Header(default=None, alias="api-key", include_in_schema=False),
) -> str:
    return services(request).auth.project(authorization, api_key)


def list_page(
    data: list[dict[str, Any]], has_more: bool, *, object_: str | None = "list"
) -> dict[str, Any]:
    """A page of a cursor-paged list: OpenAI's (``"object": "list"``) or, with ``object_``
    None, Anthropic's (the same fields, no ``object``)."""
    page: dict[str, Any] = {} if object_ is None else {"object": object_}
    page.update(
        data=data,
        first_id=data[0]["id"] if data else None,
        last_id=data[-1]["id"] if data else None,
        has_more=has_more,
    )
    return page


class CreateBatch(msgspec.Struct, forbid_unknown_fields=False):
    input_file_id: Any = None
    endpoint: Any = None
    completion_window: Any = None
    metadata: Any = None
    output_expires_after: Any = None


_create_batch = msgspec.json.Decoder(CreateBatch)

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "example": "batch"},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {
                            "type": "integer",
                            "minimum": 3600,
                            "maximum": 2592000,
                        },
                    },
                }
            }
        },
    }
}
_CREATE_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["input_file_id", "endpoint", "completion_window"],
                    "properties": {
                        "input_file_id": {"type": "string"},
                        "endpoint": {"type": "string", "example": "/v1/chat/completions"},
                        "completion_window": {"type": "string", "example": "24h"},
                        "metadata": {
                            "type": "object",
                            "maxProperties": 16,
                            "additionalProperties": {"type": "string", "maxLength": 512},
                        },
                        "output_expires_after": {
                            "type": "object",
                            "properties": {
                                "anchor": {"type": "string", "enum": ["created_at"]},
                                "seconds": {
                                    "type": "integer",
                                    "minimum": 3600,
                                    "maximum": 2592000,
                                },
                            },
                        },
                    },
                }
            }
        },
    }
}
NDJSON = "application/x-ndjson"
_RESULTS_DOC = """\
**An extension beyond OpenAI and Azure.** The batch's results committed so far (each \
checkpoint commits the results that arrived since the one before, every \
`engine.checkpoint_seconds`), as JSONL: one line a result in the shape of the batch's output \
file (`succeeded`) or error file (every other outcome), `{"id", "custom_id", "response", \
"error"}`, in the order they were committed. A line's `id` \
(`batch_req_<batch id without "batch_">_<n>`) is the same in every read and in the files, \
and is the cursor: `after=<id>` gives the results after that line.

- `after`: the `id` of a line of this batch (another batch's, or a malformed one: 400, \
param `after`).
- `outcome`: `succeeded` (output-file lines) or `failed` (error-file lines: failed, \
cancelled, expired).
- `follow=true`: the stream stays open and sends each result as it is committed, until the \
batch has ended and every result (the never-executed requests of a cancelled or expired \
batch included) was sent; then it ends. Every result is sent once, even when a worker dies \
and another takes its requests over: only committed results are ever read. While nothing \
is sent for `limits.results_keepalive_seconds` (15 s), one space is sent: JSON allows \
whitespace before a value, so it starts the next line and every line stays one JSON value \
(an empty line would not be valid JSONL); a stream may end with such spaces. A client \
whose connection broke reads again with `after=` the last id it got.
"""
_RESULTS_CONTENT = {NDJSON: {"schema": {"type": "string"}}}
_CONTENT_DOC = {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "application/jsonl": {"schema": {"type": "string"}},
}


def expires_after(fields: dict[str, str]) -> int | None:
    """``expires_after[anchor]`` and ``expires_after[seconds]`` of an upload form (Azure's
    ``expires_after.anchor``/``.seconds`` too): the seconds, ASCII digits only."""
    anchor = fields.get("expires_after[anchor]", fields.get("expires_after.anchor"))
    seconds = fields.get("expires_after[seconds]", fields.get("expires_after.seconds"))
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest(
            "expires_after[anchor] must be 'created_at'.",
            code="invalid_value",
            param="expires_after[anchor]",
        )
    if seconds is None or not _SECONDS.fullmatch(seconds.strip()):
        raise InvalidRequest(
            "expires_after[seconds] must be a whole number of seconds (3600 to 2592000).",
            code="invalid_value",
            param="expires_after[seconds]",
        )
    return int(seconds.strip())


def build_router() -> APIRouter:  # noqa: C901 - one small handler per route
    router = APIRouter()

    @router.post(
        "/files",
        openapi_extra=_UPLOAD_DOC,
        summary="Upload a file",
        responses=responses(FileObject, 400, 408, 409, 413),
    )
    async def upload_file(request: Request, proj: str = Depends(project)) -> Response:
        svc = services(request)
        key = check_key(request.headers.get(HEADER))
        length = content_length(request)
        if length is not None and length > svc.max_upload_bytes + FORM_OVERHEAD:
            raise TooLarge(
                f"File is larger than the limit of {svc.max_upload_bytes} bytes.",
                code="file_too_large",
                param="file",
            )
        form = await read_form(request, svc.files, hashed=key is not None)
        upload = form.upload
        try:
            if upload is None:
                raise InvalidRequest(
                    "No file in the form.", code="missing_required_parameter", param="file"
                )
            purpose = form.fields.get("purpose")
            if not purpose:
                raise InvalidRequest(
                    "purpose is required.", code="missing_required_parameter", param="purpose"
                )
            expiry = expires_after(form.fields)
            finish = functools.partial(
                svc.files.finish_upload, proj, upload, purpose=purpose, expires_after=expiry
            )
            if key is None:
                rec = await finish()
            else:
                print_ = fingerprint(upload.content_sha256(), purpose, upload.filename, expiry)
                rec = await svc.idempotency.run(
                    proj,
                    "file",
                    key,
                    print_,
                    finish,
                    functools.partial(svc.files.get, proj),
                    lambda r: r.id,
                )
                if rec.id != upload.file_id:  # a replay: these bytes are not kept
                    await upload.writer.abort()
        except BaseException:
            if upload is not None:
                await upload.writer.abort()
            raise
        return json_response(rec.to_wire())

    @router.api_route(
        "/files", methods=GET, summary="List files", responses=responses(FileList, 400)
    )
    async def list_files(
        request: Request,
        proj: str = Depends(project),
        purpose: str | None = Query(default=None, max_length=64),
        limit: int = Query(default=10000, ge=1, le=10000),
        order: Literal["asc", "desc"] = "desc",
        after: str | None = Query(default=None, pattern=_AFTER_FILE),
    ) -> Response:
        rows, more = await services(request).files.list(
            proj, purpose=purpose, limit=limit, after=after or None, order=order
        )
        return json_response(list_page([r.to_wire() for r in rows], more))

    @router.api_route(
        "/files/{file_id}",
        methods=GET,
        summary="Retrieve a file",
        responses=responses(FileObject, 404),
    )
    async def get_file(request: Request, file_id: str, proj: str = Depends(project)) -> Response:
        return json_response((await services(request).files.get(proj, file_id)).to_wire())

    @router.delete(
        "/files/{file_id}", summary="Delete a file", responses=responses(FileDeleted, 404)
    )
    async def delete_file(request: Request, file_id: str, proj: str = Depends(project)) -> Response:
        await services(request).files.delete(proj, file_id)
        return json_response({"id": file_id, "object": "file", "deleted": True})

    @router.api_route(
        "/files/{file_id}/content",
        methods=GET,
        summary="Download a file's content (Range: one bytes range, RFC 9110)",
        responses={
            **responses(None, 404, 416, ok_content=_CONTENT_DOC),
            206: {"description": "The range asked for", "content": _CONTENT_DOC},
        },
    )
    async def file_content(
        request: Request,
        file_id: str,
        proj: str = Depends(project),
        range_: str | None = Header(default=None, alias="range"),
    ) -> Response:
        files = services(request).files
        rec = await files.get(proj, file_id)
        headers = {"accept-ranges": "bytes"}
        try:
            wanted = parse_range(range_, rec.bytes)
        except RangeNotSatisfiable as exc:
            headers["content-range"] = f"bytes */{rec.bytes}"
            return error_response(416, exc.message, code=exc.code, param=exc.param, headers=headers)
        start, end, status = 0, rec.bytes, 200
        if wanted is not None:
            start, end, status = wanted.start, wanted.end, 206
            headers["content-range"] = wanted.content_range(rec.bytes)
        headers["content-length"] = str(end - start)
        media = (
            "application/jsonl" if rec.filename.endswith(".jsonl") else "application/octet-stream"
        )
        if request.method == "HEAD":
            await files.stat_content(proj, file_id)  # 404 when the bytes are gone
            return Response(status_code=status, headers=headers, media_type=media)
        _, body = await files.content(proj, file_id, start, end)
        return StreamingResponse(body, status_code=status, headers=headers, media_type=media)

    @router.api_route(
        "/usage",
        methods=GET,
        summary="Tokens per deployment: enqueued (held by the quotas) and used (an extension)",
        responses=responses(UsageList),
    )
    async def usage(request: Request, proj: str = Depends(project)) -> Response:
        rows = await services(request).usage.token_usage(proj)
        return json_response({"object": "list", "data": [r.to_wire() for r in rows]})

    @router.post(
        "/batches",
        openapi_extra=_CREATE_DOC,
        summary="Create a batch",
        responses=responses(BatchObject, 400, 404, 408, 409, 413),
    )
    async def create_batch(request: Request, proj: str = Depends(project)) -> Response:
        key = check_key(request.headers.get(HEADER))
        body = await read_json(request, _create_batch)
        svc = services(request)
        fields = {
            "input_file_id": body.input_file_id,
            "endpoint": body.endpoint,
            "completion_window": body.completion_window,
            "metadata": body.metadata,
            "output_expires_after": body.output_expires_after,
        }
        create = functools.partial(svc.batches.create, proj, api=api_of(request), **fields)
        if key is None:
            rec = await create()
        else:
            rec = await svc.idempotency.run(
                proj,
                "batch",
                key,
                fingerprint(fields, api_of(request)),
                create,
                functools.partial(svc.batches.get, proj),
                lambda r: r.id,
            )
        if rec.status == "in_progress":
            services(request).wake_engine()
            await services(request).readiness.note_queued(rec.id)
        return json_response(rec.to_wire())

    @router.api_route(
        "/batches",
        methods=GET,
        summary="List batches, newest first",
        responses=responses(BatchList, 400),
    )
    async def list_batches(
        request: Request,
        proj: str = Depends(project),
        limit: int = Query(default=20, ge=1, le=100),
        after: str | None = Query(default=None, pattern=_AFTER_BATCH),
    ) -> Response:
        rows, more = await services(request).batches.list(proj, limit=limit, after=after or None)
        return json_response(list_page([r.to_wire() for r in rows], more))

    @router.api_route(
        "/batches/{batch_id}",
        methods=GET,
        summary="Retrieve a batch",
        responses=responses(BatchObject, 404),
    )
    async def get_batch(request: Request, batch_id: str, proj: str = Depends(project)) -> Response:
        return json_response((await services(request).batches.get(proj, batch_id)).to_wire())

    @router.api_route(
        "/batches/{batch_id}/results",
        methods=GET,
        summary="Stream a batch's results committed so far, or follow them (an extension)",
        description=_RESULTS_DOC,
        responses=responses(None, 400, 404, ok_content=_RESULTS_CONTENT),
    )
    async def batch_results(
        request: Request,
        batch_id: str,
        proj: str = Depends(project),
        after: str | None = Query(default=None, max_length=128),
        outcome: Literal["succeeded", "failed"] | None = None,
        follow: bool = False,
    ) -> Response:
        svc = services(request)
        rec = await svc.batches.get(proj, batch_id)
        start = cursor_of(rec, after)
        headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
        if request.method == "HEAD":
            return Response(headers=headers, media_type=NDJSON)
        lines = svc.results.lines(rec, after=start, outcome=outcome, follow=follow)
        return StreamingResponse(lines, headers=headers, media_type=NDJSON)

    @router.post(
        "/batches/{batch_id}/cancel",
        summary="Cancel a batch",
        responses=responses(BatchObject, 404, 409),
    )
    async def cancel_batch(
        request: Request, batch_id: str, proj: str = Depends(project)
    ) -> Response:
        return json_response((await services(request).batches.cancel(proj, batch_id)).to_wire())

    return router
