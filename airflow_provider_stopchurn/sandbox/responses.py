"""The answers the sandbox writes: one response in one piece, and StopChurn's JSON error shape."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, NamedTuple

import orjson


class _Response(NamedTuple):
    """A response the handler writes in one piece; ``status == 0`` means: close without answering."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


_DROP = _Response(0, b"", None)
#: A queued entry that lets its request through, processed as usual (see ``SandboxServer.queue_pass``).
_PASS = _Response(-1, b"", None)


def _json_response(status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _Response(status, orjson.dumps(payload), "application/json", headers)


def _error_response(status: int, message: str, error: str | None = None) -> _Response:
    """An error answer in the shape of StopChurn's documented ones: ``{"statusCode", "message", "error"}``."""
    if error is None:
        error = HTTPStatus(status).phrase
    return _json_response(status, {"statusCode": status, "message": message, "error": error})


#: The answer to a body above ``FaultConfig.max_body_bytes``.
_TOO_LARGE = _error_response(413, "Payload too large", "Payload Too Large")
