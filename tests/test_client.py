"""StopChurnClient against real local servers: the sandbox, and a tiny recording server for headers."""

from __future__ import annotations

import email.utils
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import mock

import pytest
import requests

from airflow_provider_stopchurn import __version__
from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.api.transport import Pacer, SendResult
from airflow_provider_stopchurn.api.urls import DEFAULT_BASE_URL
from airflow_provider_stopchurn.exceptions import (
    DeliveryError,
    SourceDataError,
    StopChurnAuthError,
    StopChurnConfigError,
    StopChurnHTTPError,
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer

KEY = "sandbox-test-key"
FAST: dict[str, Any] = {"backoff_base": 0.001, "backoff_max": 0.005}


def update(row_id: str, kind: str = "insert", brand: int = 1, table: str = "user") -> dict[str, Any]:
    return {
        "type": kind,
        "data": {
            "brandId": brand,
            "tableName": table,
            "data": {"id": row_id, "email": f"{row_id}@example.com"},
            "createdAt": 1694357675000,
            "updatedAt": 1694357675000,
        },
    }


@pytest.fixture
def client(stopchurn_sandbox: SandboxServer) -> Iterator[StopChurnClient]:
    with StopChurnClient(stopchurn_sandbox.url, KEY, conn_id="sc_test", max_retries=3, **FAST) as c:
        yield c


# --- a recording server, to see exactly what the client sends ------------------------------------------------
class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, dict[str, str], bytes]]

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.server.seen.append((self.path, dict(self.headers.items()), body))  # type: ignore[attr-defined]
        self.server.ports.add(self.client_address[1])  # type: ignore[attr-defined]
        payload = b'{"statusCode":200,"message":"Updates received"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    server.seen = []  # type: ignore[attr-defined]
    server.ports = set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- what goes on the wire -------------------------------------------------------------------------------------
def test_headers_and_body_on_the_wire(recorder: ThreadingHTTPServer) -> None:
    with StopChurnClient(_url(recorder) + "/", "k-123") as c:
        result = c.post_updates([update("1")])
    assert result == SendResult(status=200, message="Updates received", attempts=1, waited_s=0.0)
    [(path, headers, body)] = recorder.seen  # type: ignore[attr-defined]
    assert path == "/client-data/update"
    assert headers["Authorization"] == "Bearer k-123"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == f"airflow-provider-stopchurn/{__version__}"
    assert json.loads(body) == {"data": [update("1")]}


def test_post_update_body_sends_the_bytes_unchanged(recorder: ThreadingHTTPServer) -> None:
    body = b'{"data": [ ]}'
    with StopChurnClient(_url(recorder), "k") as c:
        c.post_update_body(body)
        c.post_events([{"brandId": 1, "userId": "5", "name": "ORDER_INITIATED"}])
    (p1, _, b1), (p2, _, b2) = recorder.seen  # type: ignore[attr-defined]
    assert (p1, b1) == ("/client-data/update", body)
    assert p2 == "/client-data/event"
    assert json.loads(b2) == {"data": [{"brandId": 1, "userId": "5", "name": "ORDER_INITIATED"}]}


def test_keep_alive_reuses_one_connection(recorder: ThreadingHTTPServer) -> None:
    with StopChurnClient(_url(recorder), "k") as c:
        for _ in range(5):
            c.post_updates([])
    assert len(recorder.ports) == 1  # type: ignore[attr-defined]


# --- success and permanent errors ------------------------------------------------------------------------------
def test_200_applies_updates(client: StopChurnClient, stopchurn_sandbox: SandboxServer) -> None:
    result = client.post_updates([update("1"), update("2")])
    assert (result.status, result.message, result.attempts) == (200, "Updates received", 1)
    assert [r["id"] for r in stopchurn_sandbox.rows(1, "user")] == ["1", "2"]
    assert client.post_events([{"brandId": 1, "userId": "1", "name": "X", "value": 3}]).message == ("Events received")
    assert stopchurn_sandbox.events(1) == [{"brandId": 1, "userId": "1", "name": "X", "value": 3}]


def test_acknowledgement_without_message_is_success(client: StopChurnClient, stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.queue_response(200, {"statusCode": 200})
    result = client.post_updates([])
    assert (result.status, result.attempts) == (200, 1)
    assert "statusCode" in result.message  # the body itself stands in for the missing message


# --- a 200 that is not StopChurn's acknowledgement -------------------------------------------------------------
HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Example Domain</title></head>"
    "<body><h1>Example Domain</h1><p>This domain is for use in examples.</p></body></html>"
)


@pytest.mark.parametrize(
    ("body", "headers", "quoted"),
    [
        ("OK", None, '2 bytes starting "OK"'),
        (None, None, "an empty body"),
        ({"ok": True}, None, '{"ok":true}'),
        ({"message": "Updates received"}, None, "Updates received"),  # no statusCode
        ({"statusCode": 500, "message": "boom"}, None, '"statusCode":500'),
        ({"statusCode": "200", "message": "Updates received"}, None, '"statusCode":"200"'),
        (b"[200]", {"Content-Type": "application/json"}, '"[200]"'),
        (HTML_PAGE, {"Content-Type": "text/html"}, "<!DOCTYPE html>\\n<html><head><title>Example Domain"),
    ],
    ids=[
        "text",
        "empty",
        "json-without-statusCode",
        "message-only",
        "statusCode-500",
        "statusCode-string",
        "array",
        "html",
    ],
)
def test_200_without_acknowledgement_is_transient(
    stopchurn_sandbox: SandboxServer, body: Any, headers: dict[str, str] | None, quoted: str
) -> None:
    for _ in range(3):
        stopchurn_sandbox.queue_response(200, body, headers)
    with (
        StopChurnClient(stopchurn_sandbox.url, KEY, conn_id="sc_test", max_retries=2, **FAST) as c,
        pytest.raises(TransientDeliveryError) as info,
    ):
        c.post_updates([update("1")])
    err = info.value
    assert (err.status, err.attempts, err.permanent) == (200, 3, False)
    text = str(err)
    assert "HTTP 200 without StopChurn's acknowledgement" in text
    assert quoted in text
    assert f"base URL {stopchurn_sandbox.url} may be wrong" in text
    assert "sc_test" in text
    assert stopchurn_sandbox.stats()["requests"] == 3
    assert stopchurn_sandbox.rows(1, "user") == []


def test_html_200_from_a_proxy_is_retried_then_fails(stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.set_faults(FaultConfig(seed=0, html_ok_rate=1.0))
    with (
        StopChurnClient(stopchurn_sandbox.url, KEY, max_retries=3, **FAST) as c,
        pytest.raises(TransientDeliveryError) as info,
    ):
        c.post_updates([update("1"), update("2")])
    err = info.value
    assert (err.status, err.attempts, err.permanent) == (200, 4, False)
    assert "4 attempts" in str(err)
    assert "text/html" in str(err)
    assert '"<!DOCTYPE html>\\n<html><head><title>' in str(err)  # the page start, line break made printable
    assert "may be wrong" in str(err)
    stats = stopchurn_sandbox.stats()
    assert (stats["requests"], stats["faults"]["html_ok"], stats["accepted_requests"]) == (4, 4, 0)
    assert stopchurn_sandbox.rows(1, "user") == []  # a proxy applied nothing


def test_html_200_then_acknowledgement_succeeds(
    client: StopChurnClient, stopchurn_sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    stopchurn_sandbox.queue_response(200, HTML_PAGE, {"Content-Type": "text/html"})
    with caplog.at_level("WARNING", logger="airflow_provider_stopchurn.api.client"):
        result = client.post_updates([update("1")])
    assert (result.status, result.message, result.attempts) == (200, "Updates received", 2)
    assert [r["id"] for r in stopchurn_sandbox.rows(1, "user")] == ["1"]
    assert stopchurn_sandbox.stats()["accepted_requests"] == 1
    [record] = [r for r in caplog.records if r.name == "airflow_provider_stopchurn.api.client"]
    assert "HTTP 200 without StopChurn's acknowledgement" in record.getMessage()


def test_unacknowledged_200_quotes_200_bytes_printably(
    client: StopChurnClient, stopchurn_sandbox: SandboxServer
) -> None:
    head = b"\x1b[31mred\r\n\x00\tend\xff\xfe \xe2\x80\xae"  # ANSI escape, controls, bad UTF-8, bidi override
    body = head + b"a" * (200 - len(head)) + b"AFTER-THE-QUOTE" * 10
    for _ in range(4):
        stopchurn_sandbox.queue_response(200, body)
    with pytest.raises(TransientDeliveryError) as info:
        client.post_updates([])
    text = str(info.value)
    expected = "\\x1b[31mred\\r\\n\\x00\\tend\ufffd\ufffd \\u202e" + "a" * (200 - len(head)) + '"...'
    assert f'{len(body)} bytes starting "{expected}' in text
    assert "AFTER-THE-QUOTE" not in text
    assert all(line.isprintable() for line in text.split("\n"))  # details on lines of their own, no control chars
    assert "application/octet-stream" in text


ECHOED_KEY = "sk-ECHOED-KEY-0123456789"


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        (f"POST /client-data/update\nAuthorization: Bearer {ECHOED_KEY}\n", "Authorization: Bearer ***"),
        ("x" * 190 + ECHOED_KEY, '"' + "x" * 190 + '***"'),  # the key straddles the 200-byte cut
    ],
    ids=["echo-service", "straddling-the-cut"],
)
def test_unacknowledged_200_echoing_the_key_is_masked(body: str, shown: str) -> None:
    with SandboxServer(token=ECHOED_KEY) as sb, StopChurnClient(sb.url, ECHOED_KEY, max_retries=0) as c:
        sb.queue_response(200, body)
        with pytest.raises(TransientDeliveryError) as info:
            c.post_updates([])
        sb.queue_response(200, body)
        ok, message = c.check_api_key()
    assert shown in str(info.value)
    assert not ok
    for text in (str(info.value), message):
        assert "sk-ECHO" not in text


def test_check_api_key_refuses_a_web_site(stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.set_faults(FaultConfig(seed=0, html_ok_rate=1.0))
    with StopChurnClient(stopchurn_sandbox.url, KEY, **FAST) as c:
        ok, message = c.check_api_key()
    assert not ok
    assert "HTTP 200" in message and "may be wrong" in message
    assert stopchurn_sandbox.stats()["requests"] == 1  # a single attempt


def test_400_reason_is_stopchurns_message_verbatim(client: StopChurnClient, stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.reject_ids({"42"})
    with pytest.raises(StopChurnRejectedError) as info:
        client.post_updates([update("42")])
    err = info.value
    assert err.reason == "Update reception failed: row 42 rejected by sandbox rule"
    assert (err.status, err.attempts, err.permanent) == (400, 1, True)
    assert err.reason in str(err)
    assert "sc_test" in str(err)
    assert stopchurn_sandbox.stats()["requests"] == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            "<html><head><style>p{}</style></head><body><h1>Bad  Request</h1>\n<p>nope &amp; no</p></body></html>",
            "Bad Request nope & no",
        ),
        (None, "<empty body>"),
        ("x" * 1000, "x" * 200 + "..."),
    ],
)
def test_400_without_json_body(
    client: StopChurnClient, stopchurn_sandbox: SandboxServer, body: str | None, reason: str
) -> None:
    stopchurn_sandbox.queue_response(400, body, {"Content-Type": "text/html"})
    with pytest.raises(StopChurnRejectedError) as info:
        client.post_updates([])
    assert info.value.reason == reason


def test_401_is_not_retried_and_names_the_connection(stopchurn_sandbox: SandboxServer) -> None:
    with (
        StopChurnClient(stopchurn_sandbox.url, "wrong-key", conn_id="sc_prod", **FAST) as c,
        pytest.raises(StopChurnAuthError) as info,
    ):
        c.post_updates([update("1")])
    err = info.value
    assert (err.status, err.attempts, err.permanent) == (401, 1, True)
    assert "Invalid client api token" in str(err)
    assert "sc_prod" in str(err)
    assert "password" in str(err)
    assert stopchurn_sandbox.stats()["requests"] == 1
    assert stopchurn_sandbox.rows(1, "user") == []


@pytest.mark.parametrize("status", [403, 404, 405, 409, 422, 302, 204])
def test_other_statuses_are_not_retried(client: StopChurnClient, stopchurn_sandbox: SandboxServer, status: int) -> None:
    stopchurn_sandbox.queue_response(status, {"message": f"status {status}"}, {"Location": "https://x.test/"})
    with pytest.raises(StopChurnHTTPError) as info:
        client.post_updates([])
    assert (info.value.status, info.value.attempts) == (status, 1)
    assert f"HTTP {status}" in str(info.value)
    assert stopchurn_sandbox.stats()["requests"] == 1


def test_413_raises_payload_too_large_without_retry(client: StopChurnClient, stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.queue_response(413, {"statusCode": 413, "message": "Payload too large"})
    with pytest.raises(StopChurnPayloadTooLargeError) as info:
        client.post_update_body(b'{"data":[]}')
    err = info.value
    assert isinstance(err, DeliveryError)
    assert not isinstance(err, StopChurnHTTPError)
    assert (err.status, err.attempts, err.permanent) == (413, 1, True)
    assert "11 bytes" in str(err) and "Payload too large" in str(err) and "sc_test" in str(err)
    assert stopchurn_sandbox.stats()["requests"] == 1


def test_413_from_the_sandbox_body_limit(stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.set_faults(FaultConfig(max_body_bytes=500))
    with StopChurnClient(stopchurn_sandbox.url, KEY, max_retries=5, **FAST) as c:
        with pytest.raises(StopChurnPayloadTooLargeError) as info:
            c.post_updates([update(str(i)) for i in range(20)])
        assert info.value.attempts == 1
        stats = stopchurn_sandbox.stats()
        assert (stats["requests"], stats["too_large_requests"], stats["accepted_requests"]) == (1, 1, 0)
        assert stopchurn_sandbox.rows(1, "user") == []
        assert c.post_updates([update("1")]).attempts == 1  # a small body still goes through (new connection)
    assert [r["id"] for r in stopchurn_sandbox.rows(1, "user")] == ["1"]


# --- retries -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [{"statusCode": 408, "message": "Request Timeout"}, None])
def test_408_is_retried(client: StopChurnClient, stopchurn_sandbox: SandboxServer, body: Any) -> None:
    stopchurn_sandbox.queue_response(408, body)
    result = client.post_updates([update("1")])
    assert (result.status, result.attempts) == (200, 2)
    assert stopchurn_sandbox.stats()["requests"] == 2
    assert [r["id"] for r in stopchurn_sandbox.rows(1, "user")] == ["1"]


def test_408_forever_is_transient(stopchurn_sandbox: SandboxServer) -> None:
    for _ in range(3):
        stopchurn_sandbox.queue_response(408, {"statusCode": 408, "message": "Request Timeout"})
    with (
        StopChurnClient(stopchurn_sandbox.url, KEY, max_retries=2, **FAST) as c,
        pytest.raises(TransientDeliveryError) as info,
    ):
        c.post_updates([])
    assert (info.value.status, info.value.attempts, info.value.permanent) == (408, 3, False)
    assert "HTTP 408: Request Timeout" in str(info.value)


def test_429_honours_retry_after_seconds(client: StopChurnClient, stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.queue_response(429, {"message": "Too Many Requests"}, {"Retry-After": "1"})
    start = time.monotonic()
    result = client.post_updates([update("1")])
    elapsed = time.monotonic() - start
    assert result.attempts == 2
    assert elapsed >= 1.0
    assert result.waited_s >= 1.0
    assert [r["id"] for r in stopchurn_sandbox.rows(1, "user")] == ["1"]


def test_429_honours_retry_after_http_date(client: StopChurnClient, stopchurn_sandbox: SandboxServer) -> None:
    target = math.floor(time.time()) + 2  # HTTP-dates have one-second resolution
    header = email.utils.formatdate(target, usegmt=True)
    stopchurn_sandbox.queue_response(429, None, {"Retry-After": header})
    start_wall, start = time.time(), time.monotonic()
    result = client.post_updates([])
    elapsed = time.monotonic() - start
    assert result.attempts == 2
    assert elapsed >= (target - start_wall) - 0.05
    assert elapsed < 5


def test_retry_after_is_capped(stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.queue_response(503, None, {"Retry-After": "3600"})
    with StopChurnClient(stopchurn_sandbox.url, KEY, retry_after_max=0.05, **FAST) as c:
        start = time.monotonic()
        assert c.post_updates([]).attempts == 2
    assert time.monotonic() - start < 2


def test_500_then_200(client: StopChurnClient, stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.queue_response(500, {"statusCode": 500, "message": "Internal server error"})
    result = client.post_updates([update("7")])
    assert (result.status, result.attempts) == (200, 2)
    assert stopchurn_sandbox.stats()["requests"] == 2


def test_html_502_forever_exhausts_retries(stopchurn_sandbox: SandboxServer) -> None:
    page = "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
    for _ in range(10):
        stopchurn_sandbox.queue_response(502, page, {"Content-Type": "text/html"})
    with (
        StopChurnClient(stopchurn_sandbox.url, KEY, max_retries=3, **FAST) as c,
        pytest.raises(TransientDeliveryError) as info,
    ):
        c.post_updates([update("1")])
    err = info.value
    assert (err.status, err.attempts, err.permanent) == (502, 4, False)
    assert "4 attempts" in str(err)
    assert "HTTP 502" in str(err)
    assert "502 Bad Gateway nginx" in str(err)
    assert "<h1>" not in str(err)
    assert stopchurn_sandbox.stats()["requests"] == 4


def test_injected_html_500s_forever(stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.set_faults(FaultConfig(seed=0, error_rate=1.0, html_errors=True))
    with (
        StopChurnClient(stopchurn_sandbox.url, KEY, max_retries=2, **FAST) as c,
        pytest.raises(TransientDeliveryError) as info,
    ):
        c.post_updates([])
    assert (info.value.status, info.value.attempts) == (500, 3)


def test_dropped_connection_then_success(client: StopChurnClient, stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.queue_response(0)
    result = client.post_updates([update("1")])
    assert result.attempts == 2
    assert [r["id"] for r in stopchurn_sandbox.rows(1, "user")] == ["1"]


def test_dropped_connections_forever_name_the_error_class(stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.set_faults(FaultConfig(seed=0, drop_rate=1.0))
    with (
        StopChurnClient(stopchurn_sandbox.url, KEY, max_retries=2, **FAST) as c,
        pytest.raises(TransientDeliveryError) as info,
    ):
        c.post_updates([])
    err = info.value
    assert (err.status, err.attempts) == (None, 3)
    assert "ConnectionError" in str(err)


def test_connection_refused_is_retried_then_transient() -> None:
    with (
        StopChurnClient(f"http://127.0.0.1:{_free_port()}", KEY, max_retries=1, **FAST) as c,
        pytest.raises(TransientDeliveryError) as info,
    ):
        c.post_updates([])
    assert info.value.attempts == 2


def test_read_timeout_on_slow_responses(stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.set_faults(FaultConfig(seed=0, slow_rate=1.0, slow_seconds=1.0))
    with StopChurnClient(stopchurn_sandbox.url, KEY, timeout=0.2, max_retries=1, **FAST) as c:
        start = time.monotonic()
        with pytest.raises(TransientDeliveryError) as info:
            c.post_updates([])
    assert info.value.attempts == 2
    assert "ReadTimeout" in str(info.value)
    assert time.monotonic() - start < 1.5


def test_slow_response_within_the_timeout_succeeds(stopchurn_sandbox: SandboxServer) -> None:
    stopchurn_sandbox.set_faults(FaultConfig(seed=0, slow_rate=1.0, slow_seconds=0.2))
    with StopChurnClient(stopchurn_sandbox.url, KEY, timeout=2.0, max_retries=0) as c:
        assert c.post_updates([]).attempts == 1


def test_max_total_wait_stops_early(stopchurn_sandbox: SandboxServer) -> None:
    for _ in range(3):
        stopchurn_sandbox.queue_response(429, None, {"Retry-After": "5"})
    with StopChurnClient(stopchurn_sandbox.url, KEY, max_retries=5, max_total_wait=1.0, **FAST) as c:
        start = time.monotonic()
        with pytest.raises(TransientDeliveryError) as info:
            c.post_updates([])
    assert time.monotonic() - start < 1.0
    assert (info.value.attempts, info.value.status) == (1, 429)
    assert "max_total_wait" in str(info.value)


def test_backoff_is_capped_by_backoff_max(stopchurn_sandbox: SandboxServer) -> None:
    for _ in range(4):
        stopchurn_sandbox.queue_response(500)
    with StopChurnClient(stopchurn_sandbox.url, KEY, backoff_base=100.0, backoff_max=0.02) as c:
        start = time.monotonic()
        assert c.post_updates([]).attempts == 5
    assert time.monotonic() - start < 2


def test_pacer_slows_down_every_thread(stopchurn_sandbox: SandboxServer) -> None:
    """A 429 seen by one thread holds back the next request of another thread using the same client."""
    stopchurn_sandbox.queue_response(429, None, {"Retry-After": "1"})
    results: dict[str, SendResult] = {}
    with StopChurnClient(stopchurn_sandbox.url, KEY, **FAST) as c:
        first = threading.Thread(target=lambda: results.__setitem__("a", c.post_updates([])))
        first.start()
        deadline = time.monotonic() + 5
        while c.pacer.remaining() == 0.0 and time.monotonic() < deadline:  # until the 429 set the hold
            time.sleep(0.005)
        assert c.pacer.remaining() > 0.5
        start = time.monotonic()
        second = c.post_updates([update("2")])
        elapsed = time.monotonic() - start
        first.join(timeout=10)
    assert results["a"].attempts == 2
    assert second.attempts == 1  # it did not get a 429 itself ...
    assert elapsed >= 0.8  # ... but waited for the shared hold
    assert second.waited_s >= 0.8


def test_pacer_alone() -> None:
    pacer = Pacer()
    assert pacer.remaining() == 0.0
    assert pacer.wait() == 0.0
    pacer.defer(0.2)
    pacer.defer(0.05)  # never shortens the hold
    assert pacer.remaining() > 0.1
    assert pacer.wait() >= 0.15
    assert pacer.remaining() == 0.0
    assert "Pacer(" in repr(pacer)


def test_client_is_thread_safe(stopchurn_sandbox: SandboxServer, caplog: pytest.LogCaptureFixture) -> None:
    """16 threads share one client: every update arrives, and the pool is large enough for all of them."""
    stopchurn_sandbox.set_faults(FaultConfig(seed=0, latency=0.01))
    errors: list[BaseException] = []
    client = StopChurnClient(stopchurn_sandbox.url, KEY, **FAST)

    def work(worker: int) -> None:
        try:
            for i in range(10):
                client.post_updates([update(f"{worker}-{i}")])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(16)]
    with caplog.at_level("WARNING", logger="urllib3"), client:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    assert len(stopchurn_sandbox.rows(1, "user")) == 16 * 10
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


# --- check_api_key ---------------------------------------------------------------------------------------------
def test_check_api_key(stopchurn_sandbox: SandboxServer) -> None:
    with StopChurnClient(stopchurn_sandbox.url, KEY, **FAST) as good:
        ok, message = good.check_api_key()
    assert ok, message
    assert stopchurn_sandbox.stats()["updates"] == {"insert": 0, "update": 0, "delete": 0}

    with StopChurnClient(stopchurn_sandbox.url, "nope", conn_id="sc_bad", **FAST) as bad:
        ok, message = bad.check_api_key()
    assert not ok
    assert "sc_bad" in message and "Invalid client api token" in message

    stopchurn_sandbox.queue_response(500, "<html>boom</html>")
    with StopChurnClient(stopchurn_sandbox.url, KEY, **FAST) as c:
        ok, message = c.check_api_key()
    assert not ok and "HTTP 500" in message and "boom" in message

    with StopChurnClient(f"http://127.0.0.1:{_free_port()}", KEY, **FAST) as c:
        ok, message = c.check_api_key()
    assert not ok and "ConnectionError" in message


# --- configuration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://marketplace.stopchurn.com",
        "http://10.0.0.1:8080",
        "http://example.com/",
        "ftp://marketplace.stopchurn.com",
        "marketplace.stopchurn.com",
        "https://",
        "https://user:secret@marketplace.stopchurn.com",
        "https://marketplace.stopchurn.com/?x=1",
        "https://marketplace.stopchurn.com:99999",
    ],
)
def test_refused_base_urls(url: str) -> None:
    with pytest.raises(StopChurnConfigError) as info:
        StopChurnClient(url, KEY)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8765/", "http://127.0.0.1:8765"),
        ("http://127.8.9.10", "http://127.8.9.10"),
        ("http://[::1]:8765", "http://[::1]:8765"),
        ("http://localhost:1/", "http://localhost:1"),
        ("https://marketplace-staging.stopchurn.com/", "https://marketplace-staging.stopchurn.com"),
        ("https://api.example.com/stopchurn//", "https://api.example.com/stopchurn"),
        ("", DEFAULT_BASE_URL),
        ("  ", DEFAULT_BASE_URL),
    ],
)
def test_accepted_base_urls(url: str, expected: str) -> None:
    assert StopChurnClient(url, KEY).base_url == expected


def test_ipv6_loopback_sandbox() -> None:
    with SandboxServer(token=KEY, host="::1") as sb, StopChurnClient(sb.url, KEY) as c:
        assert c.post_updates([update("1")]).status == 200


@pytest.mark.parametrize("key", ["", "   ", "abc\ndef", "abc\rdef", "clé"])
def test_bad_keys_are_refused_without_echo(key: str) -> None:
    with pytest.raises(StopChurnConfigError) as info:
        StopChurnClient("https://marketplace.stopchurn.com", key)
    assert key.strip() == "" or key not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": 0}, {"connect_timeout": -1}, {"max_retries": -1}, {"max_retries": 1.5}, {"backoff_base": -1}],
)
def test_bad_numbers_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(StopChurnConfigError):
        StopChurnClient("", KEY, **kwargs)


def test_constructor_does_no_io() -> None:
    session = mock.create_autospec(requests.Session, instance=True)
    client = StopChurnClient(f"http://127.0.0.1:{_free_port()}", KEY, session=session)
    assert session.mock_calls == []
    client.close()  # an injected session belongs to its owner
    assert session.mock_calls == []
    assert repr(client).startswith("StopChurnClient(base_url='http://127.0.0.1:")


def test_injected_session_is_used(stopchurn_sandbox: SandboxServer) -> None:
    with requests.Session() as session:
        session.headers["X-Extra"] = "1"
        c = StopChurnClient(stopchurn_sandbox.url, KEY, session=session)
        assert c.post_updates([]).status == 200
        c.close()
        assert c.post_updates([]).status == 200  # still open: the client does not own it


def test_unencodable_updates_raise_source_data_error(client: StopChurnClient) -> None:
    with pytest.raises(SourceDataError):
        client.post_updates([{"type": "insert", "data": {"value": float("nan")}}])
    with pytest.raises(SourceDataError):
        client.post_updates([{"type": "insert", "data": {"value": object()}}])


def test_client_and_exceptions_import_without_airflow() -> None:
    code = (
        "import airflow_provider_stopchurn.api.client, airflow_provider_stopchurn.exceptions; import sys; "
        "assert 'airflow' not in sys.modules, sorted(m for m in sys.modules if m.startswith('airflow'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
