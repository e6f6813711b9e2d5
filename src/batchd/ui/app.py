"""The dashboard: server-rendered pages under ``/ui``, live parts refreshed by htmx.

A Starlette application of its own, mounted by :func:`batchd.api.app.create_app`: its
errors are pages, not the API's JSON envelope, and it stays out of the OpenAPI document.
Pages (``P`` = a partial that htmx polls while something runs):

- ``/ui/`` batches, newest first, filter ``?status=``, paged ``?after=``; ``/ui/batches/rows`` P
- ``/ui/batches/{id}``: one batch; ``/ui/batches/{id}/live`` P; POST ``.../cancel``, ``.../retry``
- ``/ui/files``: files, and POST: upload a JSONL (and create a batch of it);
  ``/ui/files/{id}/content``: download
- ``/ui/deployments``: limits, slots, recent latency and errors; ``/ui/deployments/live`` P
- ``/ui/login`` (GET, POST), POST ``/ui/logout``

htmx 2.0.11 (Zero-Clause BSD, ``static/htmx.LICENSE``) is served from ``/ui/static``; no page
loads anything from another origin.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib.resources import files as package_files
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from batchd.api.auth import LOCAL_PROJECT
from batchd.api.upload import read_form
from batchd.errors import ApiError, InvalidRequest
from batchd.models import ENDPOINTS
from batchd.service.dashboard import DashboardService
from batchd.service.files import FileService
from batchd.ui import views
from batchd.ui.session import Forbidden, NotSignedIn, Sessions, Viewer

PAGE = 25
BATCH_POLL = "every 1s"
DEPLOYMENT_POLL = "every 5s"
HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

Handler = Callable[[Request], Awaitable[Response]]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("batchd.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=views.when,
        iso=views.iso,
        duration=views.duration,
        size=views.size,
        percent=views.percent,
        ms=views.seconds_ms,
    )
    env.globals.update(
        progress=views.progress,
        timeline=views.timeline,
        statuses=views.STATUSES,
        running=views.RUNNING,
        batch_poll=BATCH_POLL,
        deployment_poll=DEPLOYMENT_POLL,
    )
    return env


class Dashboard:
    def __init__(self, dashboard: DashboardService, files: FileService, sessions: Sessions) -> None:
        self._dash = dashboard
        self._files = files
        self._sessions = sessions
        self._env = _environment()

    # -- rendering ------------------------------------------------------------------------
    def _render(
        self, request: Request, viewer: Viewer, name: str, http_status: int = 200, **ctx: Any
    ) -> Response:
        html = self._env.get_template(name).render(
            viewer=viewer, auth=self._sessions.auth_enabled, path=request.url.path, **ctx
        )
        response = HTMLResponse(html, status_code=http_status, headers=HEADERS)
        self._sessions.remember(response, request, viewer)
        return response

    @staticmethod
    def _redirect(url: str) -> Response:
        return RedirectResponse(url, status_code=303, headers=HEADERS)

    def page(self, handler: Callable[[Request, Viewer], Awaitable[Response]]) -> Handler:
        """A handler with its viewer, errors shown as pages."""

        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            try:
                viewer = self._sessions.viewer(request)
            except NotSignedIn:
                if request.headers.get("hx-request"):
                    return Response(status_code=401, headers={"hx-redirect": "/ui/login"})
                return self._redirect("/ui/login")
            try:
                return await handler(request, viewer)
            except Forbidden as exc:
                return self._render(request, viewer, "error.html", 403, message=str(exc))
            except ApiError as exc:
                return self._render(
                    request, viewer, "error.html", exc.status_code, message=exc.message
                )

        return run

    # -- batches ----------------------------------------------------------------------------
    async def _batch_list(self, request: Request, viewer: Viewer) -> dict[str, Any]:
        status = request.query_params.get("status") or None
        if status is not None and status not in views.STATUSES:
            raise InvalidRequest(f"Unknown status {status!r}.")
        after = request.query_params.get("after") or None
        rows, more = await self._dash.list_batches(
            viewer.project, status=status, limit=PAGE, after=after
        )
        query = {"status": status} if status else {}
        return {
            "batches": rows,
            "more": more,
            "status": status,
            "after": after,
            "live": views.any_running(rows),
            "query": urlencode({**query, **({"after": after} if after else {})}),
            "next": urlencode({**query, "after": rows[-1].id}) if more and rows else None,
            "first": urlencode(query),
        }

    async def batches(self, request: Request, viewer: Viewer) -> Response:
        ctx = await self._batch_list(request, viewer)
        return self._render(request, viewer, "batches.html", **ctx)

    async def batch_rows(self, request: Request, viewer: Viewer) -> Response:
        ctx = await self._batch_list(request, viewer)
        return self._render(request, viewer, "_batches.html", **ctx)

    async def batch(self, request: Request, viewer: Viewer) -> Response:
        detail = await self._dash.batch(viewer.project, request.path_params["batch_id"])
        return self._render(request, viewer, "batch.html", d=detail)

    async def batch_live(self, request: Request, viewer: Viewer) -> Response:
        detail = await self._dash.batch(viewer.project, request.path_params["batch_id"])
        return self._render(request, viewer, "_batch.html", d=detail)

    async def _form_token(self, request: Request) -> None:
        form = await request.form()
        token = form.get("csrf")
        self._sessions.check_post(request, token if isinstance(token, str) else None)

    async def cancel(self, request: Request, viewer: Viewer) -> Response:
        await self._form_token(request)
        rec = await self._dash.cancel(viewer.project, request.path_params["batch_id"])
        return self._redirect(f"/ui/batches/{rec.id}")

    async def retry(self, request: Request, viewer: Viewer) -> Response:
        await self._form_token(request)
        rec = await self._dash.retry(viewer.project, request.path_params["batch_id"])
        return self._redirect(f"/ui/batches/{rec.id}")

    # -- files -----------------------------------------------------------------------------
    async def files(self, request: Request, viewer: Viewer) -> Response:
        after = request.query_params.get("after") or None
        rows, more = await self._dash.list_files(viewer.project, limit=PAGE, after=after)
        return self._render(
            request,
            viewer,
            "files.html",
            files=rows,
            next=urlencode({"after": rows[-1].id}) if more and rows else None,
            after=after,
            windows=self._dash.describe()["completion_windows"],
            endpoints=ENDPOINTS,
        )

    async def upload(self, request: Request, viewer: Viewer) -> Response:
        self._sessions.check_origin(request)
        form = await read_form(request, self._files)
        upload = form.upload
        try:
            self._sessions.check_post(request, form.fields.get("csrf"))
            if upload is None:
                raise InvalidRequest("Choose a JSONL file to upload.")
            file, batch = await self._dash.upload_batch_input(
                viewer.project or LOCAL_PROJECT,
                upload,
                create_batch=form.fields.get("create_batch") == "on",
                endpoint=form.fields.get("endpoint") or None,
                completion_window=form.fields.get("completion_window") or "24h",
            )
        except BaseException:
            if upload is not None:
                await upload.writer.abort()
            raise
        if batch is not None:
            return self._redirect(f"/ui/batches/{batch.id}")
        return self._redirect(f"/ui/files#{file.id}")

    async def download(self, request: Request, viewer: Viewer) -> Response:
        rec, body = await self._dash.download(viewer.project, request.path_params["file_id"])
        return StreamingResponse(
            body,
            media_type="application/jsonl" if rec.filename.endswith(".jsonl") else None,
            headers={
                **HEADERS,
                "content-length": str(rec.bytes),
                "content-disposition": f'attachment; filename="{_quote(rec.filename)}"',
            },
        )

    # -- deployments -------------------------------------------------------------------------
    async def deployments(self, request: Request, viewer: Viewer) -> Response:
        return await self._deployments(request, viewer, "deployments.html")

    async def deployments_live(self, request: Request, viewer: Viewer) -> Response:
        return await self._deployments(request, viewer, "_deployments.html")

    async def _deployments(self, request: Request, viewer: Viewer, name: str) -> Response:
        rows = await self._dash.deployments()
        span = next((d.recent.seconds for d in rows if d.recent is not None), 0.0)
        return self._render(request, viewer, name, deployments=rows, span=span)

    # -- signing in -------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        viewer = self._sessions.viewer(request, required=False)
        if not self._sessions.auth_enabled or viewer.signed_in:
            return self._redirect("/ui/")
        if request.method == "GET":
            return self._render(request, viewer, "login.html", error=None)
        form = await request.form()
        token, key = form.get("csrf"), form.get("key")
        try:
            self._sessions.check_post(request, token if isinstance(token, str) else None)
        except Forbidden as exc:
            return self._render(request, viewer, "error.html", 403, message=str(exc))
        key = key.strip() if isinstance(key, str) else ""
        if not key or self._sessions.project_of(key) is None:
            return self._render(request, viewer, "login.html", 401, error="That key is not valid.")
        response = self._redirect("/ui/")
        self._sessions.sign_in(response, request, key)
        return response

    async def logout(self, request: Request) -> Response:
        viewer = self._sessions.viewer(request, required=False)
        form = await request.form()
        token = form.get("csrf")
        try:
            self._sessions.check_post(request, token if isinstance(token, str) else None)
        except Forbidden as exc:
            return self._render(request, viewer, "error.html", 403, message=str(exc))
        response = self._redirect("/ui/login")
        self._sessions.sign_out(response)
        return response

    def app(self) -> Starlette:
        static = StaticFiles(directory=str(package_files("batchd.ui") / "static"))
        p = self.page
        return Starlette(
            routes=[
                Route("/", p(self.batches)),
                Route("/batches/rows", p(self.batch_rows)),
                Route("/batches/{batch_id}", p(self.batch)),
                Route("/batches/{batch_id}/live", p(self.batch_live)),
                Route("/batches/{batch_id}/cancel", p(self.cancel), methods=["POST"]),
                Route("/batches/{batch_id}/retry", p(self.retry), methods=["POST"]),
                Route("/files", p(self.files)),
                Route("/files", p(self.upload), methods=["POST"]),
                Route("/files/{file_id}/content", p(self.download)),
                Route("/deployments", p(self.deployments)),
                Route("/deployments/live", p(self.deployments_live)),
                Route("/login", self.login, methods=["GET", "POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Mount("/static", static, name="static"),
            ]
        )


def _quote(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
