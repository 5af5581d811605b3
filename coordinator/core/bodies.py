"""Request bodies: however decoding one fails, it is the client's 400, never a 500.

msgspec decodes JSON nested deeper than the interpreter's recursion limit (about 1,000 levels of
``[`` or ``{``) by raising ``RecursionError``, not ``DecodeError``, and Litestar maps only the latter
to a 400. Every HTTP request is a :class:`PoolRequest`, whose ``json()`` turns the former into the
latter, so the usual handler answers in the error envelope and nothing is logged.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import SerializationException

from coordinator.core.errors import PoolError
from shared import errors

TOO_DEEP = "The request body is nested too deeply."


class PoolRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            raise SerializationException(TOO_DEEP) from None


def decode(decoder: msgspec.json.Decoder[Any], raw: bytes) -> Any:
    """``decoder.decode(raw)``, with every failure a 400 ``invalid_request`` (for bodies read again)."""
    try:
        return decoder.decode(raw)
    except RecursionError:
        raise PoolError(400, errors.INVALID_REQUEST, TOO_DEEP) from None
    except (msgspec.DecodeError, ValueError) as exc:
        raise PoolError(400, errors.INVALID_REQUEST, f"The request body is not valid JSON: {exc}") from None
