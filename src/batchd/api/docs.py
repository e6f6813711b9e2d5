"""``/docs`` (Swagger UI), ``/redoc`` and ``/openapi.json``, working with no network.

The Swagger UI and ReDoc files come from the ``fastapi-offline`` package and are served from
``/static/docs`` (FastAPI's own pages load them from a CDN, so they are blank offline; its
ReDoc page also loads Google Fonts). The OpenAPI document lists the OpenAI tree ``/v1`` and
the two Azure trees: ``/openai`` (each operation takes Azure's ``api-version`` query
parameter, accepted and ignored) and ``/openai/v1`` (Azure's newer style, no api-version).
Their operations are those of ``/v1``; both key headers are declared as security schemes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from importlib.resources import files as package_files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

STATIC = "/static/docs"
OPENAI_TAG = "OpenAI (/v1)"
TREES = (
    # prefix, operationId suffix, tag, takes api-version
    ("/openai", "_azure", "Azure OpenAI (/openai, with api-version)", True),
    ("/openai/v1", "_azure_v1", "Azure OpenAI v1 (/openai/v1)", False),
)
DESCRIPTION = """\
The OpenAI and Azure OpenAI Batch API, self-hosted.

The same Files and Batches operations are served on three URL trees, one for each client:

| client | base URL | operations |
|---|---|---|
| `OpenAI(base_url=URL + "/v1")` | `/v1` | tagged *OpenAI (/v1)* |
| `AzureOpenAI(azure_endpoint=URL, api_version=V)` | `/openai`, `?api-version=V` on every call \
(accepted, otherwise ignored) | tagged *Azure OpenAI (/openai, with api-version)* |
| `OpenAI(base_url=URL + "/openai/v1")` | `/openai/v1` | tagged *Azure OpenAI v1 (/openai/v1)* |

They differ only where Azure does: on `/openai` a batch echoes `endpoint` as sent and an \
ended batch always has both an output and an error file (either may be empty).

Extensions beyond OpenAI and Azure say so in their description: the results of a running \
batch (`GET /batches/{batch_id}/results`, with `follow=true` a stream until it ends) and \
the tokens per deployment (`GET /usage`).

Keys go in `Authorization: Bearer KEY` (OpenAI) or `api-key: KEY` (Azure); without an \
`[auth]` table none is needed. Errors have OpenAI's shape \
`{"error": {"message", "type", "param", "code"}}`.
"""
API_VERSION = {
    "name": "api-version",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "example": "2024-07-01-preview"},
    "description": "Azure's API version: accepted and ignored.",
}


def add_trees(schema: dict[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """Copy the ``/v1`` operations of ``paths`` (router paths, e.g. ``/files``) to the
    Azure trees, with their own operation ids and tags; declare the key headers."""
    all_paths: dict[str, Any] = schema.setdefault("paths", {})
    for path in paths:
        item = all_paths.get("/v1" + path)
        if item is None:
            continue
        for op in item.values():
            if isinstance(op, dict) and "operationId" in op:
                op["tags"] = [OPENAI_TAG]
        for prefix, suffix, tag, versioned in TREES:
            copied = copy.deepcopy(item)
            for op in copied.values():
                if not isinstance(op, dict) or "operationId" not in op:
                    continue
                op["operationId"] += suffix
                op["tags"] = [tag]
                if versioned:
                    op["parameters"] = [*op.get("parameters", []), dict(API_VERSION)]
            all_paths[prefix + path] = copied
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(
        {
            "bearer": {"type": "http", "scheme": "bearer", "description": "OpenAI style"},
            "api-key": {"type": "apiKey", "in": "header", "name": "api-key"},
        }
    )
    schema["security"] = [{"bearer": []}, {"api-key": []}]
    schema["tags"] = [{"name": OPENAI_TAG}, *({"name": t[2]} for t in TREES)]
    return schema


def install(app: FastAPI, tree_paths: Iterable[str]) -> None:
    """``/docs``, ``/redoc`` and the OpenAPI document with every tree. The app must be built
    with ``docs_url=None, redoc_url=None``."""
    paths = list(tree_paths)
    app.mount(STATIC, StaticFiles(directory=str(package_files("fastapi_offline") / "static")))
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_trees(plain_openapi(), paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="batchd API",
            swagger_js_url=f"{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC}/favicon.png",
        )

    @app.api_route("/redoc", methods=["GET", "HEAD"], include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="batchd API",
            redoc_js_url=f"{STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{STATIC}/favicon.png",
            with_google_fonts=False,
        )
