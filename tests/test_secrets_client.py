"""The API key never leaks: not in log records (DEBUG, every logger), exceptions (with causes), or reprs."""

from __future__ import annotations

import json
import logging
import socket
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.hooks.stopchurn import StopChurnHook
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer

LEAK = "sk-LEAKCHECK-0123456789"
FAST: dict[str, Any] = {"backoff_base": 0.001, "backoff_max": 0.005, "max_retries": 2}


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(token=LEAK) as sb:
        yield sb


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "requests", "airflow_provider_stopchurn", "airflow"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def _exception_texts(exc: BaseException) -> Iterator[str]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield repr(vars(current))
        current = current.__cause__ or current.__context__
    yield "".join(traceback.format_exception(exc))


def assert_no_leak(caplog: pytest.LogCaptureFixture, *objects: Any, exc: BaseException | None = None) -> None:
    for record in caplog.records:
        texts = [record.getMessage(), str(record.msg), repr(record.args), repr(record.__dict__)]
        if record.exc_info and record.exc_info[1] is not None:
            texts.extend(_exception_texts(record.exc_info[1]))
        for text in texts:
            assert LEAK not in text, f"key leaked in a log record of {record.name}"
    for obj in objects:
        assert LEAK not in repr(obj)
        assert LEAK not in str(obj)
    if exc is not None:
        for text in _exception_texts(exc):
            assert LEAK not in text


def _run(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except StopChurnError as exc:
        return exc
    return None


def test_logs_are_really_captured(debug_logs: pytest.LogCaptureFixture, sandbox: SandboxServer) -> None:
    """Guard for the tests below: urllib3's and the client's DEBUG lines do reach caplog."""
    with StopChurnClient(sandbox.url, LEAK) as c:
        c.post_updates([])
    names = {r.name for r in debug_logs.records}
    assert "urllib3.connectionpool" in names
    assert "airflow_provider_stopchurn.api.client" in names


@pytest.mark.parametrize(
    "scenario",
    [
        "success",
        "401",
        "400",
        "400-html",
        "5xx-forever",
        "429",
        "408",
        "413",
        "200-html",
        "200-echo",
        "dropped",
        "timeout",
        "refused",
        "check-key",
    ],
)
def test_client_paths_never_leak_the_key(
    debug_logs: pytest.LogCaptureFixture, sandbox: SandboxServer, scenario: str
) -> None:
    key = "wrong-key-0000" if scenario == "401" else LEAK
    client = StopChurnClient(sandbox.url, key, conn_id="sc_leak", timeout=0.3, **FAST)
    if scenario == "400":
        sandbox.reject_ids({"1"})
    elif scenario == "400-html":
        sandbox.queue_response(400, "<html><body>bad</body></html>")
    elif scenario == "5xx-forever":
        sandbox.set_faults(FaultConfig(seed=0, error_rate=1.0, html_errors=True))
    elif scenario == "429":
        sandbox.set_faults(FaultConfig(seed=0, throttle_rate=1.0, retry_after=0.01))
    elif scenario == "408":
        for _ in range(3):
            sandbox.queue_response(408, {"statusCode": 408, "message": "Request Timeout"})
    elif scenario == "413":
        sandbox.set_faults(FaultConfig(seed=0, max_body_bytes=10))
    elif scenario == "200-html":
        sandbox.set_faults(FaultConfig(seed=0, html_ok_rate=1.0))
    elif scenario == "200-echo":  # a base URL pointing at a service that echoes the request, headers included
        for _ in range(4):  # 3 attempts, then check_api_key below
            sandbox.queue_response(200, f"<pre>Authorization: Bearer {LEAK}</pre>")
    elif scenario == "dropped":
        sandbox.set_faults(FaultConfig(seed=0, drop_rate=1.0))
    elif scenario == "timeout":
        sandbox.set_faults(FaultConfig(seed=0, slow_rate=1.0, slow_seconds=1.0))
    elif scenario == "refused":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        client = StopChurnClient(f"http://127.0.0.1:{port}", LEAK, conn_id="sc_leak", **FAST)
    row = {"brandId": 1, "tableName": "user", "data": {"id": "1"}, "createdAt": 10**12, "updatedAt": 10**12}
    if scenario == "check-key":
        ok, message = client.check_api_key()
        assert ok
        assert LEAK not in message
        exc = None
    else:
        exc = _run(lambda: client.post_updates([{"type": "insert", "data": row}]))
        assert (exc is None) == (scenario == "success")
    assert_no_leak(debug_logs, client, exc=exc)
    if scenario in ("401", "5xx-forever", "dropped", "200-html", "200-echo"):
        ok, message = client.check_api_key()
        assert not ok and LEAK not in message
    client.close()


@pytest.mark.parametrize(
    "url",
    ["http://marketplace.stopchurn.com", "ftp://x.test", f"https://user:{LEAK}@x.test", "https://x.test:bad"],
)
def test_config_errors_never_leak_the_key(debug_logs: pytest.LogCaptureFixture, url: str) -> None:
    exc = _run(lambda: StopChurnClient(url, LEAK))
    assert exc is not None
    assert_no_leak(debug_logs, exc=exc)


@pytest.mark.parametrize("key", [LEAK + "\n", f" {LEAK}\r\nX-Evil: 1", LEAK + "é"])
def test_malformed_keys_are_refused_without_echo(debug_logs: pytest.LogCaptureFixture, key: str) -> None:
    if key.strip() == LEAK:
        client = StopChurnClient("https://x.test", key)  # surrounding whitespace is trimmed
        assert_no_leak(debug_logs, client)
        return
    exc = _run(lambda: StopChurnClient("https://x.test", key))
    assert exc is not None
    assert_no_leak(debug_logs, exc=exc)


def test_hook_paths_never_leak_the_key(
    debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: SandboxServer,
) -> None:
    def conn(conn_id: str, **fields: Any) -> str:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "stopchurn", **fields}))
        return conn_id

    good = StopChurnHook(conn("sc_good", host=sandbox.url, password=LEAK), **FAST)
    assert good.send_updates([])["status"] == 200
    assert good.test_connection()[0]

    sandbox.set_faults(FaultConfig(seed=0, error_rate=1.0))
    exc = _run(lambda: good.send_updates([]))
    assert exc is not None
    ok, message = good.test_connection()
    assert not ok and LEAK not in message

    insecure = StopChurnHook(conn("sc_insecure", host="http://x.test", password=LEAK))
    ok, message = insecure.test_connection()
    assert not ok and LEAK not in message
    exc2 = _run(lambda: insecure.client)

    assert_no_leak(debug_logs, good, good.client, insecure, exc=exc)
    assert exc2 is not None
    assert_no_leak(debug_logs, exc=exc2)
    out, err = capfd.readouterr()
    assert LEAK not in out and LEAK not in err
