"""A base URL's user info, query and fragment are never quoted: not in errors, logs, reprs or the Test message.

Airflow masks only the connection's password; a token in ``https://user:token@host/?key=token#token`` would reach
the task log and the connection form's Test message whole. Every error the client can raise about its base URL
(and the hook's Test of a connection with such a host) renders it as ``scheme://host:port/path`` at most.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterator

import pytest

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.api.urls import safe_url
from airflow_provider_stopchurn.exceptions import StopChurnConfigError, StopChurnError
from airflow_provider_stopchurn.hooks.stopchurn import StopChurnHook
from airflow_provider_stopchurn.sandbox import SandboxServer

SECRET = "hUsh-t0ken"  # distinctive: the word "secret" is in this file's own path
KEY = "sk-test-base-url-0123456789"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "requests", "airflow_provider_stopchurn"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def _texts(exc: BaseException) -> Iterator[str]:
    yield str(exc)
    yield repr(exc)
    yield "".join(traceback.format_exception(exc))


def _assert_quiet(logs: pytest.LogCaptureFixture, *texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text
    for record in logs.records:
        assert SECRET not in record.getMessage(), record.getMessage()


def _secret_urls(port: int) -> list[str]:
    """Every kind of base URL the client refuses, each carrying the secret where it must not be quoted."""
    return [
        f"https://user:{SECRET}@127.0.0.1:{port}/p?token={SECRET}#frag",  # all three
        f"https://user:{SECRET}@127.0.0.1:{port}/p",  # user info
        f"https://127.0.0.1:{port}/p?token={SECRET}",  # query
        f"https://127.0.0.1:{port}/p#{SECRET}",  # fragment
        f"http://127.0.0.1:{port}/p?token={SECRET}#frag",  # loopback http, query
        f"http://user:{SECRET}@stopchurn.example/p?token={SECRET}",  # plain http to a remote host
        f"https://127.0.0.1:{SECRET}/p?token={SECRET}",  # a port that is not a number
        f"https://127.0.0.1:99999/p?token={SECRET}",  # a port out of range
        f"ftp://user:{SECRET}@127.0.0.1/p?token={SECRET}",  # another scheme
        f"https://user:{SECRET}@/p?token={SECRET}",  # no host
        f"user:{SECRET}@127.0.0.1/p?token={SECRET}",  # no scheme
    ]


def test_safe_url_keeps_scheme_host_port_and_path_only() -> None:
    assert safe_url(f"https://user:{SECRET}@127.0.0.1:8443/p?token={SECRET}#frag") == "https://127.0.0.1:8443/p"
    assert safe_url("HTTPS://Marketplace.StopChurn.com") == "https://marketplace.stopchurn.com"
    assert safe_url(f"https://[::1]:8080/api?x={SECRET}") == "https://[::1]:8080/api"
    assert safe_url(f"https://h:{SECRET}/p") == "https://h:<invalid port>/p"
    assert safe_url(f"user:{SECRET}@host/p?t={SECRET}") == "host/p"
    assert safe_url("") == "<an empty URL>"


def test_every_base_url_error_of_the_client_quotes_no_secret(logs: pytest.LogCaptureFixture) -> None:
    for url in _secret_urls(8443):
        with pytest.raises(StopChurnConfigError) as caught:
            StopChurnClient(url, KEY)
        _assert_quiet(logs, *_texts(caught.value))
        assert caught.value.args[0].splitlines()[0]  # one short first line


def test_the_connection_test_and_the_hook_quote_no_secret(
    logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stopchurn_sandbox: SandboxServer,
) -> None:
    port = stopchurn_sandbox.port
    for number, url in enumerate(_secret_urls(port)):
        conn_id = f"sc_secret_url_{number}"
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}",
            json.dumps({"conn_type": "stopchurn", "host": url, "password": KEY}),
        )
        hook = StopChurnHook(conn_id)
        ok, message = hook.test_connection()
        assert not ok
        with pytest.raises(StopChurnError) as caught:
            _ = hook.client
        texts = [message, repr(hook), hook.api_host, *_texts(caught.value)]  # api_host: in stopchurn:// assets
        _assert_quiet(logs, *texts)
        explicit = StopChurnHook(conn_id, base_url=url)
        _assert_quiet(logs, repr(explicit), explicit.test_connection()[1])
    out, err = capfd.readouterr()
    assert SECRET not in out and SECRET not in err


def test_errors_after_the_first_request_quote_the_safe_url_only(
    logs: pytest.LogCaptureFixture, stopchurn_sandbox: SandboxServer
) -> None:
    """The runtime messages that name the base URL (a 200 from something else, the key check) show its safe form."""
    sb = stopchurn_sandbox
    client = StopChurnClient(sb.url, sb.token, max_retries=0)
    sb.queue_response(200, "<html>a web site</html>")
    with pytest.raises(StopChurnError) as caught:
        client.post_updates([])
    assert f"The base URL {sb.url} may be wrong" in str(caught.value)
    sb.queue_response(503, {"statusCode": 503, "message": "down"})
    ok, message = client.check_api_key()
    assert not ok and message.startswith(f"Could not verify the API key at {sb.url} ")
    assert repr(client) == f"StopChurnClient(base_url={sb.url!r}, conn_id=None)"
    client.close()
