"""Every exception batchd raises derives from :class:`BatchdError`.

The API layer alone maps these to the OpenAI error envelope (``api/errors.py``); the service
raises them without knowing about HTTP. Driver errors are translated at the storage boundary.

    BatchdError
    ├── ConfigError                 bad configuration, found at start-up
    ├── QuotaExceeded               a limit refused a write (the store checks and takes it at once)
    ├── ApiError                    a request the service refuses (carries status/type/code/param)
    │   ├── InvalidRequest          400 invalid_request_error
    │   ├── AuthenticationFailed    401
    │   ├── NotFound                404
    │   ├── Conflict                409
    │   ├── TooLarge                413
    │   ├── RangeNotSatisfiable     416
    │   └── BodyTimeout             408  the request body stopped arriving
    ├── StoreError                  the metadata store failed
    │   └── LeaseLost               a worker's lease on a shard or batch was taken over
    └── BlobError                   the file store failed
        └── BlobNotFound
"""

from __future__ import annotations


class BatchdError(Exception):
    """Root of batchd's exceptions."""


class ConfigError(BatchdError):
    """The configuration is invalid; the message names the key."""


class ApiError(BatchdError):
    status_code = 400
    error_type = "invalid_request_error"
    final = True  # a 4xx a client should not send again as it is (``x-should-retry: false``)

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class InvalidRequest(ApiError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(ApiError):
    status_code = 401
    error_type = "authentication_error"


class NotFound(ApiError):
    status_code = 404
    error_type = "invalid_request_error"


class Conflict(ApiError):
    status_code = 409
    error_type = "invalid_request_error"


class InProgress(Conflict):
    """The same request is still being handled: worth sending again shortly."""

    final = False


class TooLarge(ApiError):
    status_code = 413
    error_type = "invalid_request_error"


class RangeNotSatisfiable(ApiError):
    status_code = 416
    error_type = "invalid_request_error"


class BodyTimeout(ApiError):
    """The client stopped sending the request body (no byte for the configured time)."""

    status_code = 408
    error_type = "invalid_request_error"


class QuotaExceeded(BatchdError):
    """A count- or token-based limit refused a write; nothing was written. ``used`` is what
    was already taken when the limit was checked."""

    def __init__(self, message: str, *, used: int, scope: str = "") -> None:
        super().__init__(message)
        self.used = used
        self.scope = scope  # which limit: "deployment" or "project" for the token quotas


def excerpt(value: object, most: int = 64, *, quote: bool = True) -> str:
    """Client input as it may be echoed in an error message: a string's ``repr`` cut to about
    ``most`` characters (a 1 MB field never comes back whole; ``quote=False``: the string
    itself, cut, as ids are shown), a number or ``None`` as is, any other value by its type
    only (never rendered whole)."""
    if isinstance(value, str):
        text = repr(value[: most + 1]) if quote else value[: most + 1]
        return text if len(value) <= most and len(text) <= most else text[: most - 1] + "…"
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        bits = value.bit_length()
        return repr(value) if bits <= 64 else f"<an integer of {bits} bits>"
    return f"<{type(value).__name__}>"


class StoreError(BatchdError):
    """The metadata store failed."""


class LeaseLost(StoreError):
    """A worker's lease was taken over by another worker; it must stop writing."""


class BlobError(BatchdError):
    """The file store failed."""


class BlobNotFound(BlobError):
    pass
