"""The Files and Batches routes, mounted under ``/v1``, ``/openai`` and ``/openai/v1``.

A handler parses, calls the service once, serialises. ``api-version`` is accepted on every
route and otherwise ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import Response, StreamingResponse

from batchd.api.auth import Authenticator
from batchd.api.readiness import Readiness
from batchd.api.upload import read_form
from batchd.errors import InvalidRequest, TooLarge
from batchd.models import API_AZURE, API_OPENAI
from batchd.service.batches import BatchService
from batchd.service.files import FileService

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_ID_BATCH = re.compile(r"^batch_[0-9a-f-]{36}$")
_ID_FILE = re.compile(r"^file-[0-9a-f-]{36}$")


@dataclass
class Services:
    files: FileService
    batches: BatchService
    auth: Authenticator
    max_upload_bytes: int
    readiness: Readiness
    wake_engine: Callable[[], None]


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
    authorization: str | None = Header(default=None),
    api_key: str | None = Header(default=None, alias="api-key"),
) -> str:
    return services(request).auth.project(authorization, api_key)


def _list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _cursor(after: str | None, pattern: re.Pattern[str]) -> str | None:
    if after is None or after == "":
        return None
    if not pattern.match(after):
        raise InvalidRequest(
            f"Invalid 'after' cursor {after!r}.", code="invalid_value", param="after"
        )
    return after


def _limit(limit: int | None, default: int, most: int) -> int:
    if limit is None:
        return default
    if not 1 <= limit <= most:
        raise InvalidRequest(
            f"limit must be between 1 and {most}.", code="invalid_value", param="limit"
        )
    return limit


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
                        "expires_after[seconds]": {"type": "integer"},
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
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                }
            }
        },
    }
}


def _expires_after(fields: dict[str, str]) -> int | None:
    anchor = fields.get("expires_after[anchor]", fields.get("expires_after.anchor"))
    seconds = fields.get("expires_after[seconds]", fields.get("expires_after.seconds"))
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at" or seconds is None or not seconds.strip().isdigit():
        raise InvalidRequest(
            "expires_after needs anchor 'created_at' and a whole number of seconds.",
            code="invalid_value",
            param="expires_after",
        )
    return int(seconds)


def build_router() -> APIRouter:  # noqa: C901 - one small handler per route
    router = APIRouter()

    @router.post("/files", openapi_extra=_UPLOAD_DOC, summary="Upload a file")
    async def upload_file(request: Request, proj: str = Depends(project)) -> Response:
        svc = services(request)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > svc.max_upload_bytes + 1024 * 1024:
            raise TooLarge(
                f"File is larger than the limit of {svc.max_upload_bytes} bytes.",
                code="file_too_large",
                param="file",
            )
        form = await read_form(request, svc.files)
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
            rec = await svc.files.finish_upload(
                proj, upload, purpose=purpose, expires_after=_expires_after(form.fields)
            )
        except BaseException:
            if upload is not None:
                await upload.writer.abort()
            raise
        return json_response(rec.to_wire())

    @router.get("/files", summary="List files")
    async def list_files(
        request: Request,
        proj: str = Depends(project),
        purpose: str | None = None,
        limit: int | None = Query(default=None),
        order: str = "desc",
        after: str | None = None,
    ) -> Response:
        if order not in ("asc", "desc"):
            raise InvalidRequest(
                "order must be 'asc' or 'desc'.", code="invalid_value", param="order"
            )
        rows, more = await services(request).files.list(
            proj,
            purpose=purpose,
            limit=_limit(limit, 10000, 10000),
            after=_cursor(after, _ID_FILE),
            order=order,
        )
        return json_response(_list_page([r.to_wire() for r in rows], more))

    @router.get("/files/{file_id}", summary="Retrieve a file")
    async def get_file(request: Request, file_id: str, proj: str = Depends(project)) -> Response:
        return json_response((await services(request).files.get(proj, file_id)).to_wire())

    @router.delete("/files/{file_id}", summary="Delete a file")
    async def delete_file(request: Request, file_id: str, proj: str = Depends(project)) -> Response:
        await services(request).files.delete(proj, file_id)
        return json_response({"id": file_id, "object": "file", "deleted": True})

    @router.get("/files/{file_id}/content", summary="Download a file's content")
    async def file_content(
        request: Request,
        file_id: str,
        proj: str = Depends(project),
        range_: str | None = Header(default=None, alias="range"),
    ) -> Response:
        files = services(request).files
        rec = await files.get(proj, file_id)
        start, end, status = 0, rec.bytes, 200
        headers = {"accept-ranges": "bytes"}
        if range_:
            m = _RANGE.match(range_.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(rec.bytes, int(m.group(2)) + 1) if m.group(2) else rec.bytes
                else:
                    start = max(0, rec.bytes - int(m.group(2)))
                if start >= rec.bytes or start >= end:
                    return json_response(
                        {
                            "error": {
                                "message": "Range not satisfiable",
                                "type": "invalid_request_error",
                                "param": "range",
                                "code": "range_not_satisfiable",
                            }
                        },
                        416,
                        {"content-range": f"bytes */{rec.bytes}", "x-should-retry": "false"},
                    )
                status = 206
                headers["content-range"] = f"bytes {start}-{end - 1}/{rec.bytes}"
        _, body = await files.content(proj, file_id, start, end)
        headers["content-length"] = str(end - start)
        media = (
            "application/jsonl" if rec.filename.endswith(".jsonl") else "application/octet-stream"
        )
        return StreamingResponse(body, status_code=status, headers=headers, media_type=media)

    @router.post("/batches", openapi_extra=_CREATE_DOC, summary="Create a batch")
    async def create_batch(request: Request, proj: str = Depends(project)) -> Response:
        ctype = request.headers.get("content-type", "")
        if "json" not in ctype.lower():
            raise InvalidRequest(
                "POST /batches takes a JSON body (Content-Type: application/json).",
                code="invalid_content_type",
            )
        raw = await request.body()
        try:
            body = _create_batch.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidRequest(
                f"The body is not a JSON object: {exc}", code="invalid_json"
            ) from None
        rec = await services(request).batches.create(
            proj,
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            output_expires_after=body.output_expires_after,
            api=api_of(request),
        )
        if rec.status == "in_progress":
            services(request).wake_engine()
            await services(request).readiness.note_queued(rec.id)
        return json_response(rec.to_wire())

    @router.get("/batches", summary="List batches, newest first")
    async def list_batches(
        request: Request,
        proj: str = Depends(project),
        limit: int | None = Query(default=None),
        after: str | None = None,
    ) -> Response:
        rows, more = await services(request).batches.list(
            proj, limit=_limit(limit, 20, 100), after=_cursor(after, _ID_BATCH)
        )
        return json_response(_list_page([r.to_wire() for r in rows], more))

    @router.get("/batches/{batch_id}", summary="Retrieve a batch")
    async def get_batch(request: Request, batch_id: str, proj: str = Depends(project)) -> Response:
        return json_response((await services(request).batches.get(proj, batch_id)).to_wire())

    @router.post("/batches/{batch_id}/cancel", summary="Cancel a batch")
    async def cancel_batch(
        request: Request, batch_id: str, proj: str = Depends(project)
    ) -> Response:
        return json_response((await services(request).batches.cancel(proj, batch_id)).to_wire())

    return router
