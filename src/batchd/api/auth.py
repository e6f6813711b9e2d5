"""API keys: ``Authorization: Bearer KEY`` (OpenAI), ``api-key: KEY`` (Azure) or
``x-api-key: KEY`` (Anthropic, passed in ``api_key`` by the Message Batches routes) -> project."""

from __future__ import annotations

import hmac

from batchd.config import AuthSettings
from batchd.errors import AuthenticationFailed

LOCAL_PROJECT = "default"


class Authenticator:
    def __init__(self, auth: AuthSettings | None) -> None:
        self._keys = dict(auth.keys) if auth is not None else None

    @property
    def enabled(self) -> bool:
        return self._keys is not None

    def project(
        self, authorization: str | None, api_key: str | None, *, anthropic: bool = False
    ) -> str:
        """The project of the request's key. Both headers may be sent (clients and proxies
        add one or the other): a request is accepted when a key it carries is known, and
        when both are known they must name the same project. A scheme other than
        ``Bearer`` in ``Authorization`` is not a key. ``anthropic``: the request came to the
        Message Batches routes, where the key header is ``x-api-key`` (named in the error)."""
        if self._keys is None:
            return LOCAL_PROJECT
        candidates = []
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                candidates.append(value.strip())
        if api_key and api_key.strip():
            candidates.append(api_key.strip())
        if not candidates:
            how = (
                "'x-api-key: KEY' or 'Authorization: Bearer KEY'"
                if anthropic
                else "'Authorization: Bearer KEY' or 'api-key: KEY'"
            )
            raise AuthenticationFailed(
                f"Missing API key: send it as {how}.", code="missing_api_key"
            )
        projects = {p for p in map(self._lookup, candidates) if p is not None}
        if len(projects) == 1:
            return projects.pop()
        if projects:
            raise AuthenticationFailed(
                "The two API keys sent belong to different projects: send one.",
                code="invalid_api_key",
            )
        raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")

    def _lookup(self, key: str) -> str | None:
        """The key's project; compares with every known key in constant time each."""
        assert self._keys is not None
        found = None
        raw = key.encode("utf-8", "surrogateescape")
        for known, project in self._keys.items():
            if hmac.compare_digest(known.encode(), raw):
                found = project
        return found
