"""A local HTTP server that behaves like StopChurn's documented API.

The sandbox implements the two documented routes, ``POST /client-data/update`` and
``POST /client-data/event``, validates every request strictly against the published contract, keeps the
resulting table state in memory, and can inject faults (500s, 429s with ``Retry-After``, dropped
connections, lost acknowledgements, slow responses, 200s with an HTML page as a proxy would send) in a
deterministic, seeded order, and answer ``413`` to bodies above a size limit.

A separate inspection API under ``/_sandbox/`` (not part of StopChurn, no authentication) exposes the state
over HTTP for tools that run out of process:

* ``GET /_sandbox/health`` -> ``{"status": "ok"}``
* ``GET /_sandbox/tables/<brandId>/<tableName>`` -> ``{"rows": [...], "count": n}``
* ``GET /_sandbox/events/<brandId>`` -> ``{"events": [...], "count": n}`` (accepted events, in arrival order)
* ``POST /_sandbox/historical/<brandId>/<tableName>`` with one historical-upload file as the body (a JSON array
  of ``{"data": <row>, "createdAt": <ms>, "updatedAt": <ms>}``, at most 2 GB), as StopChurn's Back Office takes
  it: validated strictly, then every row is upserted into the table by ``id``; the answer is
  ``{"statusCode": 200, "message": "Historical data received", "rows": n}``, or a 400 naming the first problem
  (nothing of the file is applied)
* ``GET /_sandbox/received`` -> ``{"received": [[type, brandId, tableName, id], ...]}`` (when recording)
* ``GET /_sandbox/stats`` -> the same dictionary as :meth:`SandboxServer.stats`
* ``GET /_sandbox/faults`` / ``PUT /_sandbox/faults`` -> read / replace the :class:`FaultConfig`
* ``POST /_sandbox/reset`` -> same as :meth:`SandboxServer.reset`

Only the standard library and orjson are used, so the module imports nothing from Airflow.
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import logging
import math
import random
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, NamedTuple
from urllib.parse import unquote

import orjson

__all__ = ["FaultConfig", "SandboxServer"]

_log = logging.getLogger(__name__)

UPDATE_ROUTE = "/client-data/update"
EVENT_ROUTE = "/client-data/event"
INSPECTION_PREFIX = "/_sandbox/"

#: Smallest and largest (exclusive) values accepted as epoch milliseconds: 1973-03-03 .. 5138-11-16.
EPOCH_MS_MIN = 10**11
EPOCH_MS_MAX = 10**14

_UPDATE_TYPES = ("insert", "update", "delete")
_UPDATE_KEYS = frozenset({"type", "data"})
_RECORD_KEYS = frozenset({"brandId", "tableName", "data", "createdAt", "updatedAt"})
_EVENT_KEYS = frozenset({"brandId", "userId", "name", "value"})
_HISTORICAL_KEYS = frozenset({"data", "createdAt", "updatedAt"})
#: StopChurn's documented limit of one historical-upload file.
HISTORICAL_MAX_BYTES = 2_000_000_000
_FAULT_KINDS = ("error", "throttle", "drop", "drop_after_apply", "slow", "html_ok", "failing_id")
_DRAIN_LIMIT = 64 * 1024 * 1024
_MISSING: Any = object()

_HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>500 Internal Server Error</title></head>\n"
    b"<body><h1>500 Internal Server Error</h1><p>The server encountered an internal error.</p>"
    b"</body></html>\n"
)
#: What a captive portal, a proxy or a web site at the wrong base URL answers: 200 and a page, not JSON.
_HTML_OK_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Welcome</title></head>\n"
    b"<body><h1>Welcome</h1><p>This page is served by a proxy, not by the API you asked for.</p>"
    b"</body></html>\n"
)


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Which faults the sandbox injects, and how often.

    Every rate is the share (0.0 to 1.0) of StopChurn API requests that get that fault; the rates are
    exclusive bands of one random draw per request, so their sum must not exceed 1. Draws come from
    ``random.Random(seed)`` in request-arrival order, so a sequential client sees the same fault sequence
    for the same seed. Faults never apply to the ``/_sandbox/`` inspection API.

    Attributes:
        seed: seed of the random generator that picks faults.
        error_rate: answered ``500`` (JSON body, or an HTML page when ``html_errors``); nothing applied.
        throttle_rate: answered ``429`` with ``Retry-After: <retry_after>``; nothing applied.
        retry_after: seconds sent in ``Retry-After`` (an integer when whole, else a decimal).
        drop_rate: the connection is closed without any response; nothing applied.
        drop_after_apply_rate: processed normally (applied when valid), then the connection is closed
            without a response: a lost acknowledgement.
        slow_rate: the request sleeps ``slow_seconds`` before being processed normally.
        slow_seconds: the delay of a slow request.
        latency: seconds added to every API request (simulates a real network).
        html_errors: send injected 500s as an HTML page instead of JSON.
        html_ok_rate: answered ``200`` with ``Content-Type: text/html`` and an HTML page, as a proxy or a web
            site at the wrong base URL would (no authentication check); nothing applied.
        max_body_bytes: a request body larger than this many bytes is answered ``413`` with
            ``{"statusCode": 413, "message": "Payload too large", "error": "Payload Too Large"}``; nothing
            applied. Deterministic, not a rate: it is checked when the body is read, before queued responses
            and faults, and takes no random draw. ``None`` (the default) means no limit.
    """

    seed: int = 0
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    retry_after: float = 1.0
    drop_rate: float = 0.0
    drop_after_apply_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 2.0
    latency: float = 0.0
    html_errors: bool = False
    html_ok_rate: float = 0.0
    max_body_bytes: int | None = None

    def __post_init__(self) -> None:
        if type(self.seed) is not int:
            raise ValueError(f"FaultConfig.seed must be an integer, got {self.seed!r}")
        if type(self.html_errors) is not bool:
            raise ValueError(f"FaultConfig.html_errors must be a boolean, got {self.html_errors!r}")
        if self.max_body_bytes is not None and (type(self.max_body_bytes) is not int or self.max_body_bytes < 0):
            raise ValueError(
                f"FaultConfig.max_body_bytes must be None or a non-negative integer, got {self.max_body_bytes!r}"
            )
        for name in ("error_rate", "throttle_rate", "drop_rate", "drop_after_apply_rate", "slow_rate", "html_ok_rate"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultConfig.{name} must be a number between 0 and 1, got {value!r}")
        for name in ("retry_after", "slow_seconds", "latency"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < 86400.0:
                raise ValueError(f"FaultConfig.{name} must be a non-negative number of seconds, got {value!r}")
        if sum(rate for _, rate in self._bands()) > 1.0 + 1e-9:
            raise ValueError("FaultConfig: the fault rates must not add up to more than 1")

    def _bands(self) -> tuple[tuple[str, float], ...]:
        return (
            ("error", self.error_rate),
            ("throttle", self.throttle_rate),
            ("drop", self.drop_rate),
            ("drop_after_apply", self.drop_after_apply_rate),
            ("slow", self.slow_rate),
            ("html_ok", self.html_ok_rate),
        )

    @property
    def injects_faults(self) -> bool:
        """Whether any fault rate is above zero (``max_body_bytes`` is not a rate and does not count)."""
        return any(rate > 0.0 for _, rate in self._bands())

    @property
    def retry_after_header(self) -> str:
        """The ``Retry-After`` header value: an integer when whole, else a decimal."""
        value = float(self.retry_after)
        return str(int(value)) if value.is_integer() else repr(value)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dictionary (the shape ``PUT /_sandbox/faults`` accepts)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultConfig:
        """Build a configuration from a mapping; absent keys keep their defaults, unknown keys are refused.

        Raises:
            ValueError: on an unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FaultConfig field(s): {', '.join(unknown)}")
        return cls(**dict(data))


def _is_real(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]  # excludes bool


class _Response(NamedTuple):
    """A response the handler writes in one piece; ``status == 0`` means: close without answering."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


_DROP = _Response(0, b"", None)
#: A queued entry that lets its request through, processed as usual (see ``SandboxServer.queue_pass``).
_PASS = _Response(-1, b"", None)


class _Invalid(Exception):
    """A request that breaks the contract; the message is the ``<reason>`` of the 400 body."""


class _Op(NamedTuple):
    kind: str
    brand_id: int
    table_name: str
    key: tuple[str, Any]
    row: dict[str, Any]


def _json_response(status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _Response(status, orjson.dumps(payload), "application/json", headers)


def _error_response(status: int, message: str, error: str | None = None) -> _Response:
    """An error answer in the shape of StopChurn's documented ones: ``{"statusCode", "message", "error"}``."""
    if error is None:
        error = HTTPStatus(status).phrase
    return _json_response(status, {"statusCode": status, "message": message, "error": error})


#: The answer to a body above ``FaultConfig.max_body_bytes``.
_TOO_LARGE = _error_response(413, "Payload too large", "Payload Too Large")


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_extra_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    if len(obj) > len(allowed) or not allowed.issuperset(obj):
        extra = sorted(str(k) for k in obj if k not in allowed)
        if extra:
            raise _Invalid(f"{where} has unknown field(s): {', '.join(extra)}")


def _parse_batch(body: bytes) -> list[Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Invalid(f"body is not valid JSON ({exc})") from None
    if type(payload) is not dict:
        raise _Invalid(f"body must be a JSON object with a 'data' array, got {_describe(payload)}")
    _check_extra_keys(payload, frozenset({"data"}), "body")
    items = payload.get("data", _MISSING)
    if type(items) is not list:
        raise _Invalid(f"body.data must be an array, got {_describe(items)}")
    return items


def _validate_updates(items: list[Any]) -> list[_Op]:
    """Check every update of a batch against the contract; return them as operations, or raise."""
    ops: list[_Op] = []
    append = ops.append
    for i, update in enumerate(items):
        if type(update) is not dict:
            raise _Invalid(f"data[{i}] must be an object, got {_describe(update)}")
        kind = update.get("type", _MISSING)
        if type(kind) is not str or kind not in _UPDATE_TYPES:
            raise _Invalid(f"data[{i}].type must be one of insert, update, delete, got {_describe(kind)}")
        record = update.get("data", _MISSING)
        if type(record) is not dict:
            raise _Invalid(f"data[{i}].data must be an object, got {_describe(record)}")
        if len(update) != 2:
            _check_extra_keys(update, _UPDATE_KEYS, f"data[{i}]")
        brand_id = record.get("brandId", _MISSING)
        if type(brand_id) is not int:
            raise _Invalid(f"data[{i}].data.brandId must be an integer, got {_describe(brand_id)}")
        table_name = record.get("tableName", _MISSING)
        if type(table_name) is not str or not table_name:
            raise _Invalid(f"data[{i}].data.tableName must be a non-empty string, got {_describe(table_name)}")
        row = record.get("data", _MISSING)
        if type(row) is not dict:
            raise _Invalid(f"data[{i}].data.data (the row) must be an object, got {_describe(row)}")
        row_id = row.get("id", _MISSING)
        id_type = type(row_id)
        if id_type is not str and id_type is not int and id_type is not float:
            raise _Invalid(f"data[{i}].data.data.id must be a string or a number, got {_describe(row_id)}")
        for stamp_field in ("createdAt", "updatedAt"):
            stamp = record.get(stamp_field, _MISSING)
            if type(stamp) is not int or not EPOCH_MS_MIN <= stamp < EPOCH_MS_MAX:
                raise _Invalid(
                    f"data[{i}].data.{stamp_field} must be an integer epoch in milliseconds, got {_describe(stamp)}"
                )
        if len(record) != 5:
            _check_extra_keys(record, _RECORD_KEYS, f"data[{i}].data")
        append(_Op(kind, brand_id, table_name, (id_type.__name__, row_id), row))
    return ops


def _validate_events(items: list[Any]) -> list[dict[str, Any]]:
    """Check every event of a batch against the contract; return them, or raise.

    ``brandId`` an integer, ``userId`` and ``name`` non-empty strings (the documentation sends ``"553"``, a
    string), ``value`` optional and of any JSON type (its type is set per event in StopChurn, not here).
    """
    allowed = _EVENT_KEYS
    for i, event in enumerate(items):
        if type(event) is not dict:
            raise _Invalid(f"data[{i}] must be an object, got {_describe(event)}")
        size = len(event)
        if not (size == 4 and "value" in event) and not (size == 3 and "value" not in event):
            _check_extra_keys(event, allowed, f"data[{i}]")  # the three fields below are checked one by one
        brand_id = event.get("brandId", _MISSING)
        if type(brand_id) is not int:
            raise _Invalid(f"data[{i}].brandId must be an integer, got {_describe(brand_id)}")
        user_id = event.get("userId", _MISSING)
        if type(user_id) is not str or not user_id:
            raise _Invalid(f"data[{i}].userId must be a non-empty string, got {_describe(user_id)}")
        name = event.get("name", _MISSING)
        if type(name) is not str or not name:
            raise _Invalid(f"data[{i}].name must be a non-empty string, got {_describe(name)}")
    return items


def _validate_historical(body: bytes) -> list[tuple[tuple[str, Any], dict[str, Any]]]:
    """Check one historical-upload file; return its rows as ``(key, row)``, or raise.

    The file is a JSON array of ``{"data": <row>, "createdAt": <ms>, "updatedAt": <ms>}`` (exactly those keys),
    each row an object with an ``id`` that is a string or a number; an ``id`` may appear once per file.
    """
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Invalid(f"the file is not valid JSON ({exc})") from None
    if type(items) is not list:
        raise _Invalid(f"the file must be a JSON array, got {_describe(items)}")
    rows: list[tuple[tuple[str, Any], dict[str, Any]]] = []
    seen: set[tuple[str, Any]] = set()
    for i, item in enumerate(items):
        if type(item) is not dict:
            raise _Invalid(f"[{i}] must be an object, got {_describe(item)}")
        if len(item) != 3 or not _HISTORICAL_KEYS.issuperset(item):
            missing = sorted(_HISTORICAL_KEYS - set(item))
            if missing:
                raise _Invalid(f"[{i}] lacks {', '.join(missing)}")
            _check_extra_keys(item, _HISTORICAL_KEYS, f"[{i}]")
        row = item["data"]
        if type(row) is not dict:
            raise _Invalid(f"[{i}].data (the row) must be an object, got {_describe(row)}")
        row_id = row.get("id", _MISSING)
        id_type = type(row_id)
        if id_type is not str and id_type is not int and id_type is not float:
            raise _Invalid(f"[{i}].data.id must be a string or a number, got {_describe(row_id)}")
        for stamp_field in ("createdAt", "updatedAt"):
            stamp = item[stamp_field]
            if type(stamp) is not int or not EPOCH_MS_MIN <= stamp < EPOCH_MS_MAX:
                raise _Invalid(f"[{i}].{stamp_field} must be an integer epoch in milliseconds, got {_describe(stamp)}")
        key = (id_type.__name__, row_id)
        if key in seen:
            raise _Invalid(f"[{i}].data.id {row_id!r} appears twice in the file")
        seen.add(key)
        rows.append((key, row))
    return rows


@dataclass
class _Counters:
    requests: int = 0
    accepted_requests: int = 0
    rejected_requests: int = 0
    unauthorized: int = 0
    too_large_requests: int = 0
    insert: int = 0
    update: int = 0
    delete: int = 0
    events: int = 0
    historical_files: int = 0
    historical_rows: int = 0
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_FAULT_KINDS, 0))


class SandboxServer:
    """A local, in-memory StopChurn API for demos, tests and offline DAG development.

    The constructor does no I/O; :meth:`start` binds the socket and serves from a background daemon
    thread; :meth:`stop` (idempotent) shuts the server down and closes open keep-alive connections.
    It is also a context manager. After a stop, :meth:`start` serves again on the same port with the
    state kept, which lets tests simulate an outage.

    Args:
        token: the API key clients must send as ``Authorization: Bearer <token>``.
        host: address to bind; ``"::1"`` (or any address with a colon) binds IPv6.
        port: port to bind; ``0`` picks a free port, known (in :attr:`url`) once started.
        faults: the :class:`FaultConfig` to inject; none by default.
        record: keep the ordered list of applied updates returned by :meth:`received`.
        max_body_bytes: answer ``413`` to API request bodies larger than this; unlimited by default. A shorthand
            for ``FaultConfig(max_body_bytes=...)``: the limit is part of the fault configuration, so
            :meth:`set_faults` and ``PUT /_sandbox/faults`` replace it. Giving both with different values is an
            error.
        freeze_gc: after each applied batch, move every object of the process out of the cyclic garbage
            collector's reach (``gc.freeze()``). With a million rows held, the collector's passes cost more than
            the requests (measured: sandbox CPU halved on a 500k-row load). Meant for a process that runs only
            the sandbox, as the command line does; leave it off inside another program.
    """

    def __init__(
        self,
        token: str = "demo-key",  # noqa: S107 - the sandbox's own demo key, not a secret
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        faults: FaultConfig | None = None,
        record: bool = False,
        max_body_bytes: int | None = None,
        freeze_gc: bool = False,
    ) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty string")
        if faults is None:
            faults = FaultConfig()
        elif not isinstance(faults, FaultConfig):
            raise TypeError("faults must be a FaultConfig")
        if max_body_bytes is not None:
            if faults.max_body_bytes not in (None, max_body_bytes):
                raise ValueError(
                    f"max_body_bytes={max_body_bytes!r} contradicts faults.max_body_bytes={faults.max_body_bytes!r}"
                )
            faults = replace(faults, max_body_bytes=max_body_bytes)  # validated by FaultConfig
        self.token = token
        self.host = host
        self.record = record
        self.freeze_gc = freeze_gc
        self._auth_header = f"Bearer {token}".encode()
        self._port = port
        self._lock = threading.Lock()
        self._lifecycle_lock = threading.Lock()
        self._faults = faults
        self._rng = random.Random(self._faults.seed)
        self._tables: dict[tuple[int, str], dict[tuple[str, Any], dict[str, Any]]] = {}
        self._events: dict[int, list[dict[str, Any]]] = {}
        self._received: list[tuple[str, int, str, Any]] = []
        self._queue: deque[_Response] = deque()
        self._rejected_ids: frozenset[str] = frozenset()
        self._failing_ids: frozenset[str] = frozenset()
        self._counters = _Counters()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self) -> SandboxServer:
        """Bind and serve in a daemon thread; return once the socket accepts connections."""
        with self._lifecycle_lock:
            if self._httpd is not None:
                return self
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            httpd = _HTTPServer((self.host, self._port), self, family)
            self._port = httpd.server_address[1]
            thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"stopchurn-sandbox-{self._port}",
                daemon=True,
            )
            thread.start()
            self._httpd, self._thread = httpd, thread
            _log.debug("StopChurn sandbox listening on %s", self.url)
            return self

    def stop(self) -> None:
        """Stop serving and close every open connection. Calling it again does nothing."""
        with self._lifecycle_lock:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
            if httpd is None:
                return
            httpd.shutdown()
            httpd.close_connections()
            httpd.server_close()
            if thread is not None:
                thread.join(timeout=5)
            _log.debug("StopChurn sandbox on port %s stopped", self._port)

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._httpd is not None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._port else f"{self.host} (not started)"
        return f"<SandboxServer {where} running={self.running}>"

    @property
    def port(self) -> int:
        """The bound port (``0`` until started when constructed with port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the API, e.g. ``http://127.0.0.1:8765``.

        Raises:
            RuntimeError: when the port is not known yet (port 0 and never started).
        """
        if not self._port:
            raise RuntimeError("the sandbox port is chosen on start(); start the server first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    # ------------------------------------------------------------------------------------ configuration

    @property
    def faults(self) -> FaultConfig:
        """The fault configuration in force."""
        return self._faults

    @property
    def max_body_bytes(self) -> int | None:
        """The body size limit in force (``faults.max_body_bytes``); ``None`` means no limit."""
        return self._faults.max_body_bytes

    def set_faults(self, faults: FaultConfig) -> None:
        """Replace the fault configuration; its random sequence starts afresh from its seed."""
        if not isinstance(faults, FaultConfig):
            raise TypeError("set_faults expects a FaultConfig")
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)

    def queue_response(
        self,
        status: int,
        body: bytes | str | dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Script the response of the next StopChurn API request (FIFO; nothing of that request is applied).

        Args:
            status: HTTP status to send, or ``0`` to close the connection without a response.
            body: bytes as they are, text (UTF-8), a dict (sent as JSON) or nothing.
            headers: extra response headers, e.g. ``{"Retry-After": "2"}``; a ``Content-Type`` here
                replaces the default one.
        """
        if status != 0 and not 100 <= status <= 599:
            raise ValueError(f"status must be 0 (drop) or an HTTP status code, got {status!r}")
        content_type: str | None
        if body is None:
            payload, content_type = b"", None
        elif isinstance(body, bytes):
            payload, content_type = body, "application/octet-stream"
        elif isinstance(body, str):
            payload, content_type = body.encode(), "text/plain; charset=utf-8"
        elif isinstance(body, dict):
            payload, content_type = orjson.dumps(body), "application/json"
        else:
            raise TypeError("body must be bytes, str, dict or None")
        extra: list[tuple[str, str]] = []
        for name, value in (headers or {}).items():
            if name.lower() == "content-type":
                content_type = str(value)
            elif name.lower() not in ("content-length", "connection"):
                extra.append((str(name), str(value)))
        response = _DROP if status == 0 else _Response(status, payload, content_type, tuple(extra))
        with self._lock:
            self._queue.append(response)

    def queue_pass(self, count: int = 1) -> None:
        """Let the next ``count`` StopChurn API requests through, processed as usual, before the responses queued
        after this call: ``queue_pass(2); queue_response(500)`` applies two requests and answers the third 500.
        """
        if type(count) is not int or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        with self._lock:
            self._queue.extend([_PASS] * count)

    def reject_ids(self, ids: Iterable[Any]) -> None:
        """Refuse (400, nothing applied) any update request holding a row whose ``str(id)`` is in ``ids``.

        The set replaces the previous one; pass an empty set to stop rejecting.
        """
        self._rejected_ids = frozenset(str(i) for i in ids)

    def fail_ids(self, ids: Iterable[Any]) -> None:
        """Answer ``500`` (nothing applied) to any update request holding a row whose ``str(id)`` is in ``ids``.

        A server-side bug tied to one row: unlike ``error_rate`` it fails every try of such a request, and only
        those. Checked after the faults and before the rejection rules. The set replaces the previous one; pass an
        empty set to stop failing.
        """
        self._failing_ids = frozenset(str(i) for i in ids)

    def reset(self) -> None:
        """Forget tables, events, counters, recorded updates, queued responses, rejection and failing-id rules.

        The fault configuration is kept; its random sequence restarts from its seed.
        """
        with self._lock:
            self._tables.clear()
            self._events.clear()
            self._received.clear()
            self._queue.clear()
            self._rejected_ids = frozenset()
            self._failing_ids = frozenset()
            self._counters = _Counters()
            self._rng = random.Random(self._faults.seed)

    # ---------------------------------------------------------------------------------------- inspection

    def rows(self, brand_id: int, table_name: str) -> list[dict[str, Any]]:
        """Rows of a table, sorted by (type name of the id, id); copies, safe to modify."""
        with self._lock:
            table = self._tables.get((brand_id, table_name), {})
            return [dict(table[key]) for key in sorted(table)]

    def table(self, brand_id: int, table_name: str) -> dict[Any, dict[str, Any]]:
        """Rows of a table as a dict ``id -> row`` (copies).

        ``1`` and ``"1"`` stay distinct keys; ``1`` and ``1.0`` would collide here, use :meth:`rows`.
        """
        return {row["id"]: row for row in self.rows(brand_id, table_name)}

    def events(self, brand_id: int) -> list[dict[str, Any]]:
        """Accepted events of a brand, in arrival order (copies)."""
        with self._lock:
            return [dict(event) for event in self._events.get(brand_id, [])]

    def received(self) -> list[tuple[str, int, str, Any]]:
        """Every applied update as ``(type, brandId, tableName, id)``, in order.

        Raises:
            RuntimeError: when the server was built with ``record=False``.
        """
        if not self.record:
            raise RuntimeError("received() needs SandboxServer(record=True)")
        with self._lock:
            return list(self._received)

    def stats(self) -> dict[str, Any]:
        """Counters since start or the last reset (StopChurn API routes only).

        ``rejected_requests`` counts every request refused without being applied for its content: 400s, bodies
        that could not be read, and 413s; ``too_large_requests`` counts the 413s alone. ``faults`` counts the
        injected faults by kind (``error``, ``throttle``, ``drop``, ``drop_after_apply``, ``slow``,
        ``html_ok``, and ``failing_id`` for the 500s of :meth:`fail_ids`).
        """
        with self._lock:
            c = self._counters
            return {
                "requests": c.requests,
                "accepted_requests": c.accepted_requests,
                "rejected_requests": c.rejected_requests,
                "unauthorized": c.unauthorized,
                "too_large_requests": c.too_large_requests,
                "updates": {"insert": c.insert, "update": c.update, "delete": c.delete},
                "events": c.events,
                "historical": {"files": c.historical_files, "rows": c.historical_rows},
                "faults": dict(c.faults),
            }

    # ------------------------------------------------------------------------------- request processing

    def _count_refused(self, status: int) -> None:
        """Count an API request refused before processing: bad framing, or too large when ``status`` is 413."""
        with self._lock:
            self._counters.requests += 1
            self._counters.rejected_requests += 1
            if status == 413:
                self._counters.too_large_requests += 1

    def _process_api(self, route: str, authorization: str | None, body: bytes) -> _Response:
        """Answer one StopChurn API request: scripted response, then faults, then the real work."""
        fault: str | None = None
        with self._lock:
            self._counters.requests += 1
            faults = self._faults
            queued = self._queue.popleft() if self._queue else None
            if queued is _PASS:
                queued = None
            if queued is None and faults.injects_faults:
                draw = self._rng.random()
                for kind, rate in faults._bands():
                    if draw < rate:
                        fault = kind
                        self._counters.faults[kind] += 1
                        break
                    draw -= rate
        if faults.latency:
            time.sleep(faults.latency)
        if queued is not None:
            return queued
        if fault == "slow":
            time.sleep(faults.slow_seconds)
        elif fault == "error":
            if faults.html_errors:
                return _Response(500, _HTML_ERROR_PAGE, "text/html; charset=utf-8")
            return _error_response(500, "Internal server error")
        elif fault == "throttle":
            return _json_response(
                429,
                {"statusCode": 429, "message": "Too Many Requests", "error": "Too Many Requests"},
                (("Retry-After", faults.retry_after_header),),
            )
        elif fault == "drop":
            return _DROP
        elif fault == "html_ok":
            return _Response(200, _HTML_OK_PAGE, "text/html; charset=utf-8")
        response = self._process_valid(route, authorization, body)
        return _DROP if fault == "drop_after_apply" else response

    def _process_valid(self, route: str, authorization: str | None, body: bytes) -> _Response:
        if authorization is None or not hmac.compare_digest(
            authorization.encode("utf-8", "surrogateescape"), self._auth_header
        ):
            with self._lock:
                self._counters.unauthorized += 1
            return _error_response(401, "Invalid client api token")
        is_update = route == UPDATE_ROUTE
        prefix = "Update reception failed: " if is_update else "Event reception failed: "
        try:
            items = _parse_batch(body)
            if is_update:
                ops = _validate_updates(items)
                failing = self._failing_ids
                if failing and any(str(op.key[1]) in failing for op in ops):
                    with self._lock:
                        self._counters.faults["failing_id"] += 1
                    return _error_response(500, "Internal server error")
                rejected = self._rejected_ids
                if rejected:
                    for op in ops:
                        if str(op.key[1]) in rejected:
                            raise _Invalid(f"row {op.key[1]} rejected by sandbox rule")
            else:
                events = _validate_events(items)
        except _Invalid as exc:
            with self._lock:
                self._counters.rejected_requests += 1
            return _error_response(400, prefix + str(exc))
        with self._lock:
            counters = self._counters
            counters.accepted_requests += 1
            if is_update:
                self._apply_locked(ops)
            else:
                for event in events:
                    self._events.setdefault(event["brandId"], []).append(event)
                counters.events += len(events)
        if is_update:
            return _json_response(200, {"statusCode": 200, "message": "Updates received"})
        return _json_response(200, {"statusCode": 200, "message": "Events received"})

    def _apply_locked(self, ops: list[_Op]) -> None:
        counters = self._counters
        tables = self._tables
        received = self._received if self.record else None
        last_name: tuple[int, str] | None = None
        table: dict[tuple[str, Any], dict[str, Any]] = {}
        for kind, brand_id, table_name, key, row in ops:
            if last_name != (brand_id, table_name):
                last_name = (brand_id, table_name)
                table = tables.setdefault(last_name, {})
            if kind == "delete":
                table.pop(key, None)
                counters.delete += 1
            else:
                table[key] = row
                if kind == "insert":
                    counters.insert += 1
                else:
                    counters.update += 1
            if received is not None:
                received.append((kind, brand_id, table_name, key[1]))
        if self.freeze_gc:
            gc.freeze()

    def _process_inspection(self, method: str, path: str, body: bytes) -> _Response:
        """Answer one ``/_sandbox/`` request (no auth, no faults)."""
        parts = [unquote(p) for p in path[len(INSPECTION_PREFIX) :].split("/")]
        route = (method, parts[0], len(parts))
        if route == ("GET", "health", 1):
            return _json_response(200, {"status": "ok"})
        if route == ("GET", "stats", 1):
            return _json_response(200, self.stats())
        if route == ("POST", "reset", 1):
            self.reset()
            return _json_response(200, {"status": "reset"})
        if route == ("GET", "faults", 1):
            return _json_response(200, self._faults.to_dict())
        if route == ("PUT", "faults", 1):
            try:
                payload = orjson.loads(body)
                if type(payload) is not dict:
                    raise ValueError("body must be a JSON object of FaultConfig fields")
                config = FaultConfig.from_dict(payload)
            except (ValueError, TypeError) as exc:
                return _error_response(400, f"Invalid fault configuration: {exc}")
            self.set_faults(config)
            return _json_response(200, config.to_dict())
        if route == ("GET", "received", 1):
            if not self.record:
                return _error_response(409, "the sandbox was started without recording")
            return _json_response(200, {"received": self.received()})
        if method == "POST" and parts[0] == "historical" and len(parts) == 3:
            return self._upload_historical(parts[1], parts[2], body)
        if method == "GET" and parts[0] in ("tables", "events"):
            try:
                brand_id = int(parts[1]) if len(parts) > 1 else None
            except ValueError:
                brand_id = None
            if brand_id is not None and parts[0] == "tables" and len(parts) == 3 and parts[2]:
                rows = self.rows(brand_id, parts[2])
                return _json_response(200, {"rows": rows, "count": len(rows)})
            if brand_id is not None and parts[0] == "events" and len(parts) == 2:
                events = self.events(brand_id)
                return _json_response(200, {"events": events, "count": len(events)})
        return _error_response(404, f"Cannot {method} {path}")

    def _upload_historical(self, brand: str, table_name: str, body: bytes) -> _Response:
        """Apply one historical-upload file to a table (the Back Office's upload), or refuse all of it."""
        prefix = "Historical upload failed: "
        try:
            brand_id = int(brand)
        except ValueError:
            return _error_response(400, f"{prefix}the brand id must be an integer, got {brand!r}")
        if not table_name:
            return _error_response(400, f"{prefix}the table name is empty")
        if len(body) > HISTORICAL_MAX_BYTES:
            return _error_response(413, f"{prefix}a file may hold at most {HISTORICAL_MAX_BYTES} bytes")
        try:
            rows = _validate_historical(body)
        except _Invalid as exc:
            return _error_response(400, prefix + str(exc))
        with self._lock:
            table = self._tables.setdefault((brand_id, table_name), {})
            for key, row in rows:
                table[key] = row
                if self.record:
                    self._received.append(("historical", brand_id, table_name, key[1]))
            self._counters.historical_files += 1
            self._counters.historical_rows += len(rows)
        return _json_response(200, {"statusCode": 200, "message": "Historical data received", "rows": len(rows)})


class _HTTPServer(ThreadingHTTPServer):
    """Threaded HTTP/1.1 server tracking its connections, so that :meth:`SandboxServer.stop` closes them."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], sandbox: SandboxServer, family: socket.AddressFamily):
        self.address_family = family
        self.sandbox = sandbox
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall; skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open connection, so that idle keep-alive clients see the server go away."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log.debug("StopChurn sandbox: error while serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """Reads one request at a time from a keep-alive connection and writes each response in one piece."""

    protocol_version = "HTTP/1.1"
    server_version = "StopChurnSandbox/0.1"
    disable_nagle_algorithm = True  # TCP_NODELAY on every accepted socket
    server: _HTTPServer

    _API_ROUTES: ClassVar[frozenset[str]] = frozenset({UPDATE_ROUTE, EVENT_ROUTE})
    _api_request = False  # the request being read is a StopChurn API request (counted in stats)
    _refused = False  # _refuse answered the request being read

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("StopChurn sandbox %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        sandbox = self.server.sandbox
        path = self.path.split("?", 1)[0]
        self._api_request, self._refused = path in self._API_ROUTES, False
        if path in self._API_ROUTES:
            body = self._read_body(sandbox.max_body_bytes)
            if body is None:
                if not self._refused:  # the client went away in the middle of its body
                    sandbox._count_refused(0)
                return
            if method != "POST":
                response = _error_response(404, f"Cannot {method} {path}")
            else:
                response = sandbox._process_api(path, self.headers.get("Authorization"), body)
        else:
            body = self._read_body(None)
            if body is None:
                return
            if path.startswith(INSPECTION_PREFIX):
                response = sandbox._process_inspection(method, path, body)
            else:
                response = _error_response(404, f"Cannot {method} {path}")
        self.log_request(response.status or "-")
        self._send(response)

    def _read_body(self, limit: int | None) -> bytes | None:
        """Read the request body (Content-Length or chunked); on a framing error answer it and return None."""
        encoding = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if encoding and encoding != "identity":
            if encoding != "chunked":
                self._refuse(_error_response(501, f"Transfer-Encoding {encoding} is not supported"))
                return None
            return self._read_chunked(limit)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self._refuse(_error_response(400, "invalid Content-Length"))
            return None
        if limit is not None and length > limit:
            self._refuse(_TOO_LARGE, length)
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return None
        return body

    def _read_chunked(self, limit: int | None) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._refuse(_error_response(400, "malformed chunked body"))
                return None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if limit is not None and total > limit:
                self._refuse(_TOO_LARGE)
                return None
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                self.close_connection = True
                return None
            parts.append(chunk)
            self.rfile.readline(3)

    def _refuse(self, response: _Response, drain: int = 0) -> None:
        """Answer a request whose body could not be read, then close the connection."""
        self._refused = True
        if self._api_request:  # counted before answering, so that a client sees the count with the answer
            self.server.sandbox._count_refused(response.status)
        if 0 < drain <= _DRAIN_LIMIT:  # read the body first so that the client sees the answer
            while drain > 0:
                chunk = self.rfile.read(min(drain, 1 << 20))
                if not chunk:
                    break
                drain -= len(chunk)
        self.close_connection = True
        self.log_request(response.status)
        self._send(response)

    def _send(self, response: _Response) -> None:
        if response.status == 0:
            self.close_connection = True
            return
        status = response.status
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        head = [f"HTTP/1.1 {status} {reason}", f"Server: {self.server_version}"]
        if response.content_type is not None:
            head.append(f"Content-Type: {response.content_type}")
        head.append(f"Content-Length: {len(response.body)}")
        head.extend(f"{name}: {value}" for name, value in response.headers)
        if self.close_connection:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body
        self.wfile.write(data)
