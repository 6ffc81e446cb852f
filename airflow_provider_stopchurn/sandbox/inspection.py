"""The ``/_sandbox/`` inspection API: health, state, counters, fault configuration, reset and the historical
upload, over HTTP for tools that run out of process. Not part of StopChurn: no authentication, no faults.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import unquote

import orjson

from airflow_provider_stopchurn.sandbox.contract import INSPECTION_PREFIX
from airflow_provider_stopchurn.sandbox.faults import FaultConfig
from airflow_provider_stopchurn.sandbox.responses import _error_response, _json_response, _Response


class _Inspected(Protocol):
    """What the inspection API reads and changes (:class:`~airflow_provider_stopchurn.sandbox.server.SandboxServer`)."""

    record: bool

    @property
    def faults(self) -> FaultConfig: ...

    def set_faults(self, faults: FaultConfig) -> None: ...

    def reset(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def received(self) -> list[tuple[str, int, str, Any]]: ...

    def rows(self, brand_id: int, table_name: str) -> list[dict[str, Any]]: ...

    def events(self, brand_id: int) -> list[dict[str, Any]]: ...

    def _upload_historical(self, brand: str, table_name: str, body: bytes) -> _Response: ...


def answer_inspection(sandbox: _Inspected, method: str, path: str, body: bytes) -> _Response:
    """Answer one ``/_sandbox/`` request (no auth, no faults).

    :param sandbox: the sandbox inspected.
    :param method: the HTTP method.
    :param path: the request path, without its query string.
    :param body: the request body.
    :return: the response to write.
    """
    parts = [unquote(p) for p in path[len(INSPECTION_PREFIX) :].split("/")]
    route = (method, parts[0], len(parts))
    if route == ("GET", "health", 1):
        return _json_response(200, {"status": "ok"})
    if route == ("GET", "stats", 1):
        return _json_response(200, sandbox.stats())
    if route == ("POST", "reset", 1):
        sandbox.reset()
        return _json_response(200, {"status": "reset"})
    if route == ("GET", "faults", 1):
        return _json_response(200, sandbox.faults.to_dict())
    if route == ("PUT", "faults", 1):
        try:
            payload = orjson.loads(body)
            if type(payload) is not dict:
                raise ValueError("body must be a JSON object of FaultConfig fields")
            config = FaultConfig.from_dict(payload)
        except (ValueError, TypeError) as exc:
            return _error_response(400, f"Invalid fault configuration: {exc}")
        sandbox.set_faults(config)
        return _json_response(200, config.to_dict())
    if route == ("GET", "received", 1):
        if not sandbox.record:
            return _error_response(409, "the sandbox was started without recording")
        return _json_response(200, {"received": sandbox.received()})
    if method == "POST" and parts[0] == "historical" and len(parts) == 3:
        return sandbox._upload_historical(parts[1], parts[2], body)
    if method == "GET" and parts[0] in ("tables", "events"):
        try:
            brand_id = int(parts[1]) if len(parts) > 1 else None
        except ValueError:
            brand_id = None
        if brand_id is not None and parts[0] == "tables" and len(parts) == 3 and parts[2]:
            rows = sandbox.rows(brand_id, parts[2])
            return _json_response(200, {"rows": rows, "count": len(rows)})
        if brand_id is not None and parts[0] == "events" and len(parts) == 2:
            events = sandbox.events(brand_id)
            return _json_response(200, {"events": events, "count": len(events)})
    return _error_response(404, f"Cannot {method} {path}")
