"""The HTTP side of the sandbox: a threaded HTTP/1.1 server that tracks its connections, and the handler that
reads each request's body (``Content-Length`` or chunked, under a size limit) and routes it to the StopChurn
API or to the ``/_sandbox/`` inspection API.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol

from airflow_provider_stopchurn.sandbox.contract import EVENT_ROUTE, INSPECTION_PREFIX, UPDATE_ROUTE
from airflow_provider_stopchurn.sandbox.responses import _TOO_LARGE, _error_response, _Response

# the sandbox logs under the name it had as one module, so that a logging configuration keeps working
_log = logging.getLogger("airflow_provider_stopchurn.sandbox.server")

_DRAIN_LIMIT = 64 * 1024 * 1024


class _Processor(Protocol):
    """What the handler asks of the sandbox (:class:`~airflow_provider_stopchurn.sandbox.server.SandboxServer`)."""

    @property
    def max_body_bytes(self) -> int | None: ...

    def _count_refused(self, status: int) -> None: ...

    def _process_api(self, route: str, authorization: str | None, body: bytes) -> _Response: ...

    def _process_inspection(self, method: str, path: str, body: bytes) -> _Response: ...


class _HTTPServer(ThreadingHTTPServer):
    """Threaded HTTP/1.1 server tracking its connections, so that :meth:`SandboxServer.stop` closes them."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], sandbox: _Processor, family: socket.AddressFamily):
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
