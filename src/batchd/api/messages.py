"""Anthropic's Message Batches routes, mounted under ``/v1`` (``/v1/messages/batches``).

Keys arrive as ``x-api-key`` (the ``anthropic`` SDK), ``Authorization: Bearer`` or
``api-key``, mapped to the same projects as on the OpenAI trees. Errors on these paths have
Anthropic's shape (``api/errors.py`` chooses it by path). A handler parses, calls
:class:`MessageBatchService` once, serialises.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import Response, StreamingResponse

from batchd.api.jsonbody import check_json_type, decode_json, read_limited
from batchd.api.openapi import (
    DeletedMessageBatch,
    MessageBatchList,
    MessageBatchObject,
    anthropic_responses,
)
from batchd.api.routes import GET, json_response, list_page, services
from batchd.service.message_batches import MessageBatchService

_MSGBATCH = r"^(msgbatch_[0-9a-f-]{36})?$"

_CREATE_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["requests"],
                    "properties": {
                        "requests": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 100000,
                            "items": {
                                "type": "object",
                                "required": ["custom_id", "params"],
                                "properties": {
                                    "custom_id": {
                                        "type": "string",
                                        "pattern": "^[a-zA-Z0-9_-]{1,64}$",
                                    },
                                    "params": {
                                        "type": "object",
                                        "required": ["model", "max_tokens", "messages"],
                                        "properties": {
                                            "model": {"type": "string", "minLength": 1},
                                            "max_tokens": {"type": "integer", "minimum": 1},
                                            "messages": {"type": "array", "minItems": 1},
                                        },
                                    },
                                },
                            },
                        }
                    },
                }
            }
        },
    }
}
_RESULTS_DOC = {"application/x-jsonl": {"schema": {"type": "string"}}}


class CreateMessageBatch(msgspec.Struct, forbid_unknown_fields=False):
    requests: Any = None


_create = msgspec.json.Decoder(CreateMessageBatch)


def message_batches(request: Request) -> MessageBatchService:
    svc: MessageBatchService = request.app.state.message_batches
    return svc


def project(
    request: Request,
    authorization: str | None = Header(default=None, include_in_schema=False),
    x_api_key: str | None = Header(default=None, alias="x-api-key", include_in_schema=False),
    api_key: str | None = Header(default=None, alias="api-key", include_in_schema=False),
) -> str:
    return services(request).auth.project(authorization, x_api_key or api_key, anthropic=True)


def base_url(request: Request) -> str:
    return str(request.base_url)


def build_router() -> APIRouter:
    router = APIRouter()

    @router.post(
        "/messages/batches",
        openapi_extra=_CREATE_DOC,
        summary="Create a Message Batch (Anthropic)",
        responses=anthropic_responses(MessageBatchObject, 400, 408, 413),
    )
    async def create(request: Request, proj: str = Depends(project)) -> Response:
        svc = message_batches(request)
        check_json_type(request.headers.get("content-type", ""))
        raw = await read_limited(request, svc.max_body_bytes)
        body = decode_json(raw, _create)
        row, rec = await svc.create(proj, body.requests)
        services(request).wake_engine()
        await services(request).readiness.note_queued(rec.id)
        return json_response(await svc.to_wire(row, rec, base_url(request)))

    @router.api_route(
        "/messages/batches",
        methods=GET,
        summary="List Message Batches, newest first (Anthropic)",
        responses=anthropic_responses(MessageBatchList, 400),
    )
    async def list_(
        request: Request,
        proj: str = Depends(project),
        limit: int = Query(default=20, ge=1, le=1000),
        after_id: str | None = Query(default=None, pattern=_MSGBATCH),
        before_id: str | None = Query(default=None, pattern=_MSGBATCH),
    ) -> Response:
        svc = message_batches(request)
        rows, more = await svc.list(
            proj, limit=limit, after=after_id or None, before=before_id or None
        )
        data = [await svc.to_wire(row, rec, base_url(request)) for row, rec in rows]
        return json_response(list_page(data, more, object_=None))

    @router.api_route(
        "/messages/batches/{message_batch_id}",
        methods=GET,
        summary="Retrieve a Message Batch (Anthropic)",
        responses=anthropic_responses(MessageBatchObject, 404),
    )
    async def retrieve(
        request: Request, message_batch_id: str, proj: str = Depends(project)
    ) -> Response:
        svc = message_batches(request)
        row, rec = await svc.get(proj, message_batch_id)
        return json_response(await svc.to_wire(row, rec, base_url(request)))

    @router.post(
        "/messages/batches/{message_batch_id}/cancel",
        summary="Cancel a Message Batch (Anthropic)",
        responses=anthropic_responses(MessageBatchObject, 404, 409),
    )
    async def cancel(
        request: Request, message_batch_id: str, proj: str = Depends(project)
    ) -> Response:
        svc = message_batches(request)
        row, rec = await svc.cancel(proj, message_batch_id)
        return json_response(await svc.to_wire(row, rec, base_url(request)))

    @router.delete(
        "/messages/batches/{message_batch_id}",
        summary="Delete an ended Message Batch and its results (Anthropic)",
        responses=anthropic_responses(DeletedMessageBatch, 400, 404),
    )
    async def delete(
        request: Request, message_batch_id: str, proj: str = Depends(project)
    ) -> Response:
        await message_batches(request).delete(proj, message_batch_id)
        return json_response({"id": message_batch_id, "type": "message_batch_deleted"})

    @router.api_route(
        "/messages/batches/{message_batch_id}/results",
        methods=GET,
        summary="The results of an ended Message Batch, JSONL (Anthropic)",
        responses=anthropic_responses(None, 400, 404, ok_content=_RESULTS_DOC),
    )
    async def results(
        request: Request, message_batch_id: str, proj: str = Depends(project)
    ) -> Response:
        lines = await message_batches(request).results(proj, message_batch_id)
        if request.method == "HEAD":
            return Response(media_type="application/x-jsonl")
        return StreamingResponse(lines, media_type="application/x-jsonl")

    return router
