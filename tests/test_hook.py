"""StopChurnHook: connection from AIRFLOW_CONN_<ID>, extras, overrides, and calls against the sandbox."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest
import requests

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.api.transport import SendResult
from airflow_provider_stopchurn.api.urls import DEFAULT_BASE_URL
from airflow_provider_stopchurn.exceptions import StopChurnAuthError, StopChurnConfigError, StopChurnRejectedError
from airflow_provider_stopchurn.hooks.stopchurn import StopChurnHook
from airflow_provider_stopchurn.sandbox import SandboxServer

KEY = "sandbox-test-key"
UPDATE = {
    "type": "insert",
    "data": {
        "brandId": 3,
        "tableName": "user",
        "data": {"id": "u1", "marketingPreferences": {"email": True, "phone": False}},
        "createdAt": 1694357675000,
        "updatedAt": 1694357675000,
    },
}


@pytest.fixture
def set_conn(monkeypatch: pytest.MonkeyPatch) -> Any:
    def _set(conn_id: str = "sc_test", **fields: Any) -> str:
        fields.setdefault("conn_type", "stopchurn")
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))
        return conn_id

    return _set


def test_class_attributes() -> None:
    assert StopChurnHook.conn_name_attr == "stopchurn_conn_id"
    assert StopChurnHook.default_conn_name == "stopchurn_default"
    assert StopChurnHook.conn_type == "stopchurn"
    assert StopChurnHook.hook_name == "StopChurn"
    assert StopChurnHook().stopchurn_conn_id == "stopchurn_default"


def test_constructor_does_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    # No connection exists under this id: building the hook must still succeed.
    monkeypatch.delenv("AIRFLOW_CONN_NOWHERE", raising=False)
    session = mock.create_autospec(requests.Session, instance=True)
    hook = StopChurnHook("nowhere", base_url="https://x.test", timeout=3, max_retries=1, session=session)
    assert session.mock_calls == []
    assert repr(hook) == "StopChurnHook(stopchurn_conn_id='nowhere', base_url='https://x.test')"


def test_client_from_sandbox_connection(set_conn: Any, stopchurn_sandbox: SandboxServer) -> None:
    conn_id = set_conn(host=stopchurn_sandbox.url, password=KEY, extra={"brand_id": 3})
    hook = StopChurnHook(conn_id, backoff_base=0.001, backoff_max=0.005)
    client = hook.get_conn()
    assert isinstance(client, StopChurnClient)
    assert client is hook.client  # cached
    assert client.base_url == stopchurn_sandbox.url
    assert client.conn_id == conn_id
    assert hook.brand_id == 3

    result = hook.send_updates([UPDATE])
    assert result == {"status": 200, "message": "Updates received", "attempts": 1}
    assert stopchurn_sandbox.rows(3, "user")[0]["id"] == "u1"

    body = json.dumps({"data": [UPDATE]}).encode()
    assert hook.send_update_body(body) == SendResult(200, "Updates received", 1, 0.0)


def test_send_events(set_conn: Any, stopchurn_sandbox: SandboxServer) -> None:
    conn_id = set_conn(host=stopchurn_sandbox.url, password=KEY)
    hook = StopChurnHook(conn_id)
    events = [
        {"brandId": 3, "userId": "553", "name": "ORDER_INITIATED", "value": 4000},
        {"brandId": 3, "userId": "7", "name": "LOGIN"},
    ]
    assert hook.send_events(events) == {"status": 200, "message": "Events received", "attempts": 1}
    body = json.dumps({"data": events[:1]}).encode()
    assert hook.send_event_body(body).message == "Events received"
    assert stopchurn_sandbox.events(3) == [*events, events[0]]
    with pytest.raises(StopChurnRejectedError, match="userId must be a non-empty string"):
        hook.send_events([{"brandId": 3, "userId": 553, "name": "LOGIN"}])  # the documentation sends strings


def test_test_connection_good_and_wrong_key(set_conn: Any, stopchurn_sandbox: SandboxServer) -> None:
    good = set_conn("sc_good", host=stopchurn_sandbox.url, password=KEY)
    ok, message = StopChurnHook(good).test_connection()
    assert ok, message
    assert stopchurn_sandbox.stats()["updates"] == {"insert": 0, "update": 0, "delete": 0}

    bad = set_conn("sc_wrong", host=stopchurn_sandbox.url, password="not-the-key")
    ok, message = StopChurnHook(bad).test_connection()
    assert not ok
    assert "refused the API key (401" in message
    assert "Invalid client api token" in message
    # Airflow's Test button tests a copy under a random temporary id: the message names no id at all
    assert "sc_wrong" not in message and "connection '" not in message.lower()


def test_test_connection_never_raises(set_conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ok, message = StopChurnHook(set_conn("sc_nokey", host="https://x.test")).test_connection()
    assert not ok and "password" in message and "sc_nokey" not in message

    ok, message = StopChurnHook(set_conn("sc_http", host="http://x.test", password="k")).test_connection()
    assert not ok and "http://" in message

    monkeypatch.delenv("AIRFLOW_CONN_SC_ABSENT", raising=False)
    ok, message = StopChurnHook("sc_absent").test_connection()
    assert not ok and "sc_absent" in message


def test_send_updates_wrong_key_raises(set_conn: Any, stopchurn_sandbox: SandboxServer) -> None:
    hook = StopChurnHook(set_conn(host=stopchurn_sandbox.url, password="nope"))
    with pytest.raises(StopChurnAuthError, match="sc_test"):
        hook.send_updates([UPDATE])


def test_missing_password_names_the_conn_id(set_conn: Any) -> None:
    hook = StopChurnHook(set_conn("sc_empty", host="https://marketplace.stopchurn.com", password=""))
    with pytest.raises(StopChurnConfigError, match=r"'sc_empty'.*password"):
        _ = hook.client


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, DEFAULT_BASE_URL),
        ({"host": ""}, DEFAULT_BASE_URL),
        ({"host": "marketplace-staging.stopchurn.com"}, "https://marketplace-staging.stopchurn.com"),
        ({"host": "https://marketplace-staging.stopchurn.com/"}, "https://marketplace-staging.stopchurn.com"),
        ({"host": "127.0.0.1", "schema": "http", "port": 8765}, "http://127.0.0.1:8765"),
        ({"host": "http://localhost:9000", "port": 1}, "http://localhost:9000"),
        # the port the form asks for (443) is the scheme's own: left out of the URL
        ({"host": "https://marketplace.stopchurn.com", "port": 443}, DEFAULT_BASE_URL),
        ({"host": "marketplace.stopchurn.com", "port": 443}, DEFAULT_BASE_URL),
        ({"host": "marketplace-staging.stopchurn.com", "port": 8443}, "https://marketplace-staging.stopchurn.com:8443"),
        ({"host": "127.0.0.1", "schema": "http", "port": 80}, "http://127.0.0.1"),
        ({"host": "https://marketplace.stopchurn.com", "port": 0}, DEFAULT_BASE_URL),
    ],
)
def test_base_url_from_host(set_conn: Any, fields: dict[str, Any], expected: str) -> None:
    hook = StopChurnHook(set_conn(password="k-12345", **fields))
    assert hook.client.base_url == expected


def test_uri_form_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SC_URI", "stopchurn://:k-12345@marketplace.stopchurn.com/?brand_id=5&timeout=12")
    hook = StopChurnHook("sc_uri")
    assert hook.client.base_url == DEFAULT_BASE_URL
    assert hook.brand_id == 5
    assert (hook.client.timeout, hook.client.connect_timeout) == (12.0, 10.0)


def test_extras_parsing_and_strings_from_the_ui(set_conn: Any) -> None:
    hook = StopChurnHook(set_conn(password="k-12345", extra={"brand_id": "42", "timeout": "4.5", "max_retries": "2"}))
    assert hook.brand_id == 42
    assert (hook.client.timeout, hook.client.connect_timeout, hook.client.max_retries) == (4.5, 4.5, 2)


def test_prefixed_extras_are_read_too(set_conn: Any) -> None:
    extra = {"extra__stopchurn__brand_id": 9, "extra__stopchurn__timeout": 20, "extra__stopchurn__max_retries": 0}
    hook = StopChurnHook(set_conn(password="k-12345", extra=extra))
    assert hook.brand_id == 9
    assert (hook.client.timeout, hook.client.connect_timeout, hook.client.max_retries) == (20.0, 10.0, 0)


def test_plain_extras_win_over_prefixed(set_conn: Any) -> None:
    hook = StopChurnHook(set_conn(password="k", extra={"brand_id": 1, "extra__stopchurn__brand_id": 2}))
    assert hook.brand_id == 1


def test_empty_extras_mean_defaults(set_conn: Any) -> None:
    hook = StopChurnHook(set_conn(password="k", extra={"brand_id": "", "timeout": None, "max_retries": " "}))
    assert hook.brand_id is None
    defaults = StopChurnClient("", "k")
    assert (hook.client.timeout, hook.client.max_retries) == (defaults.timeout, defaults.max_retries)


BAD_EXTRAS = [
    ({"brand_id": "abc"}, "Brand id (extra 'brand_id') must be an integer >= 1, got 'abc'"),
    ({"brand_id": "0"}, "Brand id (extra 'brand_id') must be an integer >= 1, got '0'"),
    ({"brand_id": "-1"}, "Brand id (extra 'brand_id') must be an integer >= 1, got '-1'"),
    ({"brand_id": 0}, "Brand id (extra 'brand_id') must be an integer >= 1, got 0"),
    ({"brand_id": 1.5}, "Brand id (extra 'brand_id')"),
    ({"brand_id": True}, "Brand id (extra 'brand_id')"),
    ({"timeout": "abc"}, "Timeout (seconds) (extra 'timeout') must be a number of seconds > 0, got 'abc'"),
    ({"timeout": "0"}, "Timeout (seconds) (extra 'timeout') must be a number of seconds > 0, got '0'"),
    ({"timeout": "-1"}, "Timeout (seconds) (extra 'timeout') must be a number of seconds > 0, got '-1'"),
    ({"timeout": "nan"}, "Timeout (seconds) (extra 'timeout')"),
    ({"max_retries": "abc"}, "Max retries (extra 'max_retries') must be an integer >= 0, got 'abc'"),
    ({"max_retries": "-1"}, "Max retries (extra 'max_retries') must be an integer >= 0, got '-1'"),
    ({"max_retries": "2.5"}, "Max retries (extra 'max_retries')"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_EXTRAS)
def test_bad_extras_are_refused_naming_the_field_and_the_connection(
    set_conn: Any, extra: dict[str, Any], message: str
) -> None:
    """What the form's text fields let through ("abc", "0", "-1") is refused, never read as null or clamped."""
    hook = StopChurnHook(set_conn("sc_badextra", password="k-12345", extra=extra))
    with pytest.raises(StopChurnConfigError) as info:
        _ = hook.brand_id, hook.client
    assert str(info.value).startswith("Connection 'sc_badextra': ")
    assert message in str(info.value)


@pytest.mark.parametrize(("extra", "message"), BAD_EXTRAS)
def test_test_connection_reports_bad_extras_naming_the_field(
    set_conn: Any, stopchurn_sandbox: SandboxServer, extra: dict[str, Any], message: str
) -> None:
    hook = StopChurnHook(set_conn("sc_formtest", host=stopchurn_sandbox.url, password=KEY, extra=extra))
    ok, text = hook.test_connection()
    assert not ok
    assert text.startswith("The connection: ") and message in text
    assert "sc_formtest" not in text
    assert stopchurn_sandbox.stats()["requests"] == 0  # refused before anything is sent


def test_zero_retries_is_a_valid_extra(set_conn: Any) -> None:
    assert StopChurnHook(set_conn(password="k-12345", extra={"max_retries": "0"})).client.max_retries == 0


def test_hook_arguments_override_extras(set_conn: Any) -> None:
    conn_id = set_conn(host="https://marketplace.stopchurn.com", password="k", extra={"timeout": 50, "max_retries": 9})
    hook = StopChurnHook(
        conn_id,
        base_url="https://marketplace-staging.stopchurn.com",
        timeout=3,
        max_retries=1,
        connect_timeout=0.5,
        max_total_wait=7,
    )
    client = hook.client
    assert client.base_url == "https://marketplace-staging.stopchurn.com"
    assert (client.timeout, client.connect_timeout, client.max_retries) == (3.0, 0.5, 1)
    assert client.max_total_wait == 7.0


def test_injected_session_reaches_the_client(set_conn: Any, stopchurn_sandbox: SandboxServer) -> None:
    with requests.Session() as session:
        hook = StopChurnHook(set_conn(host=stopchurn_sandbox.url, password=KEY), session=session)
        hook.send_updates([])
        hook.client.close()
        assert hook.send_updates([])["status"] == 200  # the session is the caller's, still open


def test_get_hook_from_connection(set_conn: Any) -> None:
    from airflow.sdk import BaseHook

    hook = BaseHook.get_hook(set_conn("sc_gethook", password="k"))
    assert isinstance(hook, StopChurnHook)
    assert hook.stopchurn_conn_id == "sc_gethook"


def test_repr_never_shows_the_key(set_conn: Any) -> None:
    hook = StopChurnHook(set_conn(password="k-secret-98765"))
    _ = hook.client
    assert "k-secret-98765" not in repr(hook)
    assert "k-secret-98765" not in repr(hook.client)


# --- every bad extra at once ------------------------------------------------------------------------------------
ALL_BAD = {"brand_id": "abc", "timeout": "0", "max_retries": "-1"}


def test_test_connection_reports_every_bad_extra_in_one_message(
    set_conn: Any, stopchurn_sandbox: SandboxServer
) -> None:
    """One Test shows every field to fix: a short first line naming them, then one line per problem."""
    hook = StopChurnHook(set_conn("sc_allbad", host=stopchurn_sandbox.url, password=KEY, extra=ALL_BAD))
    ok, text = hook.test_connection()
    assert not ok
    first, *details = text.splitlines()
    assert len(first) < 120, first
    assert first == "The connection: 3 extras are invalid (brand_id, timeout, max_retries)."
    assert len(details) == 3
    assert "Brand id (extra 'brand_id') must be an integer >= 1, got 'abc'" in details[0]
    assert "Timeout (seconds) (extra 'timeout') must be a number of seconds > 0, got '0'" in details[1]
    assert "Max retries (extra 'max_retries') must be an integer >= 0, got '-1'" in details[2]
    assert "sc_allbad" not in text and KEY not in text
    assert stopchurn_sandbox.stats()["requests"] == 0


def test_a_task_reports_every_bad_client_extra_at_once(set_conn: Any) -> None:
    hook = StopChurnHook(set_conn("sc_allbad_task", password="k-12345", extra={"timeout": "x", "max_retries": "y"}))
    with pytest.raises(StopChurnConfigError) as info:
        _ = hook.client
    first, *details = str(info.value).splitlines()
    assert first == "Connection 'sc_allbad_task': 2 extras are invalid (timeout, max_retries)."
    assert [d.split(" (extra")[0].strip(" -") for d in details] == ["Timeout (seconds)", "Max retries"]


def test_no_message_about_extras_shows_the_api_key(set_conn: Any, stopchurn_sandbox: SandboxServer) -> None:
    """A key pasted into an extra's field (a slip in the form) is not echoed back."""
    key = "sk-pasted-into-the-wrong-field-4711"
    extra = {"brand_id": key, "timeout": f" {key} ", "max_retries": "x" * 500}
    hook = StopChurnHook(set_conn("sc_pasted", host=stopchurn_sandbox.url, password=key, extra=extra))
    ok, text = hook.test_connection()
    assert not ok and key not in text and "x" * 100 not in text
    assert "the API key" in text  # says what it saw, without showing it
    with pytest.raises(StopChurnConfigError) as info:
        _ = hook.client
    assert key not in str(info.value)
    # the form's length cap cuts a pasted key short: its first 19 characters are not shown either
    hook = StopChurnHook(
        set_conn("sc_pasted_cut", host=stopchurn_sandbox.url, password=key, extra={"brand_id": key[:19]})
    )
    ok, text = hook.test_connection()
    assert not ok and key[:19] not in text and "the API key (not shown)" in text
