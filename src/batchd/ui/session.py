"""Who is looking at the dashboard, and that a form was posted from it.

- **Key.** With ``[auth]``, the dashboard asks once for an API key and keeps it in the
  ``batchd_key`` cookie: ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other
  site's page sends it), ``Path=/ui``, ``Secure`` when served over HTTPS. Every request
  checks it with the API's :class:`~batchd.api.auth.Authenticator`, so a key removed from
  the configuration stops working at once. Without ``[auth]`` there is no key and every
  project is shown.
- **CSRF.** Every POST (sign-in, cancel, retry, upload) carries a ``csrf`` form field equal
  to the ``batchd_csrf`` cookie (a random token set with the page: the double-submit
  pattern), and is refused when the browser says it came from another site
  (``Sec-Fetch-Site``) or another origin (``Origin``). See
  https://cheatsheetseries.owasp.org/cheatsheets/Cross-Site_Request_Forgery_Prevention_Cheat_Sheet.html
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from batchd.api.auth import Authenticator
from batchd.errors import AuthenticationFailed

KEY_COOKIE = "batchd_key"
CSRF_COOKIE = "batchd_csrf"
COOKIE_PATH = "/ui"
KEY_MAX_AGE = 30 * 86400
MIN_TOKEN = 32  # characters of a CSRF token we would have made (43 from 32 random bytes)


class NotSignedIn(Exception):
    """The dashboard needs a key and the request has none (or a wrong one)."""


class Forbidden(Exception):
    """A POST that did not come from the dashboard's own page."""


@dataclass(frozen=True)
class Viewer:
    project: str | None  # None: auth is off, every project
    signed_in: bool
    csrf: str  # the token forms must send back
    new_csrf: bool  # the token is new: set its cookie on the response


class Sessions:
    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    @property
    def auth_enabled(self) -> bool:
        return self._auth.enabled

    def viewer(self, request: Request, *, required: bool = True) -> Viewer:
        """The request's viewer; :class:`NotSignedIn` when a key is needed and missing."""
        token = request.cookies.get(CSRF_COOKIE, "")
        new = len(token) < MIN_TOKEN
        if new:
            token = secrets.token_urlsafe(32)
        if not self._auth.enabled:
            return Viewer(None, False, token, new)
        key = request.cookies.get(KEY_COOKIE)
        project = self.project_of(key) if key else None
        if project is None and required:
            raise NotSignedIn
        return Viewer(project, project is not None, token, new)

    def project_of(self, key: str) -> str | None:
        try:
            return self._auth.project(None, key)
        except AuthenticationFailed:
            return None

    @staticmethod
    def check_origin(request: Request) -> None:
        """Raise :class:`Forbidden` when the browser says the request came from elsewhere
        (checked before reading a body)."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise Forbidden("The request came from another site.")
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = request.headers.get("host", "")
            if urlsplit(origin).netloc != host:
                raise Forbidden("The request came from another origin.")

    @classmethod
    def check_post(cls, request: Request, form_token: str | None) -> None:
        """Raise :class:`Forbidden` unless the POST came from the dashboard's page."""
        cls.check_origin(request)
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if len(cookie) < MIN_TOKEN or not form_token or not hmac.compare_digest(cookie, form_token):
            raise Forbidden("The form is out of date (no or a wrong CSRF token): reload the page.")

    @staticmethod
    def _secure(request: Request) -> bool:
        return request.url.scheme == "https"

    def remember(self, response: Response, request: Request, viewer: Viewer) -> None:
        """Set the CSRF cookie if the viewer's token is new."""
        if viewer.new_csrf:
            response.set_cookie(
                CSRF_COOKIE,
                viewer.csrf,
                path=COOKIE_PATH,
                httponly=True,
                samesite="strict",
                secure=self._secure(request),
            )

    def sign_in(self, response: Response, request: Request, key: str) -> None:
        response.set_cookie(
            KEY_COOKIE,
            key,
            max_age=KEY_MAX_AGE,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
        )

    @staticmethod
    def sign_out(response: Response) -> None:
        response.delete_cookie(KEY_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
