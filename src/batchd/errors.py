"""Every exception batchd raises derives from :class:`BatchdError`.

The API layer alone maps these to the OpenAI error envelope (``api/errors.py``); the service
raises them without knowing about HTTP. Driver errors are translated at the storage boundary.

    BatchdError
    ├── ConfigError                 bad configuration, found at start-up
    ├── ApiError                    a request the service refuses (carries status/type/code/param)
    │   ├── InvalidRequest          400 invalid_request_error
    │   ├── AuthenticationFailed    401
    │   ├── NotFound                404
    │   ├── Conflict                409
    │   └── TooLarge                413
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


class TooLarge(ApiError):
    status_code = 413
    error_type = "invalid_request_error"


class StoreError(BatchdError):
    """The metadata store failed."""


class LeaseLost(StoreError):
    """A worker's lease was taken over by another worker; it must stop writing."""


class BlobError(BatchdError):
    """The file store failed."""


class BlobNotFound(BlobError):
    pass
