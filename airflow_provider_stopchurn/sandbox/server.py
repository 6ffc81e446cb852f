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

The server is split by job: :mod:`.contract` checks requests against the contract, :mod:`.tables` holds the
state and applies updates, :mod:`.faults` injects faults, :mod:`.inspection` answers ``/_sandbox/``,
:mod:`.handler` speaks HTTP; this module holds :class:`SandboxServer`, which ties them together and runs them.
Only the standard library and orjson are used, so the package imports nothing from Airflow.
"""

from __future__ import annotations

import hmac
import logging
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, Self

from airflow_provider_stopchurn.api.closing import ClosedByWith
from airflow_provider_stopchurn.sandbox.contract import (
    HISTORICAL_MAX_BYTES,
    UPDATE_ROUTE,
    _Invalid,
    _parse_batch,
    _validate_events,
    _validate_historical,
    _validate_updates,
)
from airflow_provider_stopchurn.sandbox.faults import (
    FaultConfig,
    draw_fault,
    fault_response,
    scripted_response,
)
from airflow_provider_stopchurn.sandbox.handler import _HTTPServer
from airflow_provider_stopchurn.sandbox.inspection import answer_inspection
from airflow_provider_stopchurn.sandbox.responses import _DROP, _PASS, _error_response, _json_response, _Response
from airflow_provider_stopchurn.sandbox.tables import _Tables

__all__ = ["FaultConfig", "SandboxServer"]

_log = logging.getLogger(__name__)


class SandboxServer(ClosedByWith):
    """A local, in-memory StopChurn API for demos, tests and offline DAG development.

    The constructor does no I/O; :meth:`start` binds the socket and serves from a background daemon
    thread; :meth:`stop` (idempotent) shuts the server down and closes open keep-alive connections.
    It is also a context manager: the ``with`` block starts it and ends with :meth:`close` (:meth:`stop`). After
    a stop, :meth:`start` serves again on the same port with the state kept, which lets tests simulate an outage.

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
        self._state = _Tables()
        self._queue: deque[_Response] = deque()
        self._rejected_ids: frozenset[str] = frozenset()
        self._failing_ids: frozenset[str] = frozenset()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = self.url if self._port else f"{self.host} (not started)"
        return f"<SandboxServer {where} running={self.running}>"

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self) -> Self:
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

    def close(self) -> None:
        """Stop serving, as leaving a ``with`` block does: the same as :meth:`stop`."""
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._httpd is not None

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
        response = scripted_response(status, body, headers)
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
            self._state.clear()
            self._queue.clear()
            self._rejected_ids = frozenset()
            self._failing_ids = frozenset()
            self._rng = random.Random(self._faults.seed)

    # ---------------------------------------------------------------------------------------- inspection

    def rows(self, brand_id: int, table_name: str) -> list[dict[str, Any]]:
        """Rows of a table, sorted by (type name of the id, id); copies, safe to modify."""
        with self._lock:
            return self._state.rows(brand_id, table_name)

    def table(self, brand_id: int, table_name: str) -> dict[Any, dict[str, Any]]:
        """Rows of a table as a dict ``id -> row`` (copies).

        ``1`` and ``"1"`` stay distinct keys; ``1`` and ``1.0`` would collide here, use :meth:`rows`.
        """
        return {row["id"]: row for row in self.rows(brand_id, table_name)}

    def events(self, brand_id: int) -> list[dict[str, Any]]:
        """Accepted events of a brand, in arrival order (copies)."""
        with self._lock:
            return self._state.events_of(brand_id)

    def received(self) -> list[tuple[str, int, str, Any]]:
        """Every applied update as ``(type, brandId, tableName, id)``, in order.

        Raises:
            RuntimeError: when the server was built with ``record=False``.
        """
        if not self.record:
            raise RuntimeError("received() needs SandboxServer(record=True)")
        with self._lock:
            return list(self._state.received)

    def stats(self) -> dict[str, Any]:
        """Counters since start or the last reset (StopChurn API routes only).

        ``rejected_requests`` counts every request refused without being applied for its content: 400s, bodies
        that could not be read, and 413s; ``too_large_requests`` counts the 413s alone. ``faults`` counts the
        injected faults by kind (``error``, ``throttle``, ``drop``, ``drop_after_apply``, ``slow``,
        ``html_ok``, and ``failing_id`` for the 500s of :meth:`fail_ids`).
        """
        with self._lock:
            return self._state.stats()

    # ------------------------------------------------------------------------------- request processing

    def _count_refused(self, status: int) -> None:
        """Count an API request refused before processing: bad framing, or too large when ``status`` is 413."""
        with self._lock:
            self._state.counters.requests += 1
            self._state.counters.rejected_requests += 1
            if status == 413:
                self._state.counters.too_large_requests += 1

    def _process_api(self, route: str, authorization: str | None, body: bytes) -> _Response:
        """Answer one StopChurn API request: scripted response, then faults, then the real work."""
        fault: str | None = None
        with self._lock:
            self._state.counters.requests += 1
            faults = self._faults
            queued = self._queue.popleft() if self._queue else None
            if queued is _PASS:
                queued = None
            if queued is None and faults.injects_faults:
                fault = draw_fault(faults, self._rng)
                if fault is not None:
                    self._state.counters.faults[fault] += 1
        if faults.latency:
            time.sleep(faults.latency)
        if queued is not None:
            return queued
        if fault == "slow":
            time.sleep(faults.slow_seconds)
        elif fault is not None and fault != "drop_after_apply":
            return fault_response(fault, faults)
        response = self._process_valid(route, authorization, body)
        return _DROP if fault == "drop_after_apply" else response

    def _process_valid(self, route: str, authorization: str | None, body: bytes) -> _Response:
        if authorization is None or not hmac.compare_digest(
            authorization.encode("utf-8", "surrogateescape"), self._auth_header
        ):
            with self._lock:
                self._state.counters.unauthorized += 1
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
                        self._state.counters.faults["failing_id"] += 1
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
                self._state.counters.rejected_requests += 1
            return _error_response(400, prefix + str(exc))
        with self._lock:
            self._state.counters.accepted_requests += 1
            if is_update:
                self._state.apply_updates(ops, record=self.record, freeze_gc=self.freeze_gc)
            else:
                self._state.add_events(events)
        if is_update:
            return _json_response(200, {"statusCode": 200, "message": "Updates received"})
        return _json_response(200, {"statusCode": 200, "message": "Events received"})

    def _process_inspection(self, method: str, path: str, body: bytes) -> _Response:
        """Answer one ``/_sandbox/`` request (no auth, no faults)."""
        return answer_inspection(self, method, path, body)

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
            self._state.apply_historical(brand_id, table_name, rows, record=self.record)
        return _json_response(200, {"statusCode": 200, "message": "Historical data received", "rows": len(rows)})
