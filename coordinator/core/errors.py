"""The coordinator's one exception base, mapped to the API's error envelope in ``app.py``.

PoolError
 ├─ status/code/message/param pick the HTTP response
 └─ headers (e.g. Retry-After) are added to it
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response

from shared import errors

_json = msgspec.json.Encoder()


class PoolError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str
    param: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


def error_body(status: int, code: str, message: str, param: str | None = None) -> ErrorBody:
    return ErrorBody(ErrorDetail(message=message, type=errors.error_type(status), code=code, param=param))


def invalid_api_key() -> PoolError:
    return PoolError(
        401, errors.INVALID_API_KEY, "Invalid or missing API key. Send `Authorization: Bearer pool_live_…`."
    )


def too_many(what: str, wait: int) -> PoolError:
    """429: too many ``what`` from this address, with when to retry."""
    return PoolError(
        429,
        errors.RATE_LIMIT_EXCEEDED,
        f"Too many {what} from this address. Retry in {wait} s.",
        headers={"retry-after": str(wait)},
    )


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> Response[Any]:
    """The envelope as a response, for handlers that answer an error without raising."""
    return Response(
        _json.encode(error_body(status, code, message, param)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )
