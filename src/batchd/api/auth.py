"""API keys: ``Authorization: Bearer KEY`` (OpenAI) or ``api-key: KEY`` (Azure) -> project."""

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

    def project(self, authorization: str | None, api_key: str | None) -> str:
        if self._keys is None:
            return LOCAL_PROJECT
        key = api_key
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                key = value.strip()
        if not key:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer KEY' or 'api-key: KEY'.",
                code="missing_api_key",
            )
        for known, project in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return project
        raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
