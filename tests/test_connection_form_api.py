"""The connection form's Test button, through a real ``airflow api-server`` and the REST calls its UI makes.

Airflow 3.3.2's UI tests a saved connection from the connections list with ``POST /api/v2/connections/test``
and a body built from the connection as ``GET /api/v2/connections`` returns it: every field as it is (``""``
for null), the password masked (``"***"``), and ``"port": Number(port)``, which is ``0`` for a null port. The
API reuses the stored credentials only when the host and port sent equal the stored ones, and ``0`` is not
``null``: a connection saved without a port gets 400 "The host or port to test differs from the stored
connection", shown as "Bad Request". The StopChurn form therefore shows the port field and asks for 443;
the hook leaves the scheme's own port out of the URL.

A browser test of the form itself lives elsewhere; this one posts exactly what that UI posts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from airflow_provider_stopchurn.sandbox import SandboxServer

pytestmark = pytest.mark.usefixtures("airflow_db")


class Api:
    """A started ``airflow api-server`` (core API only) on 127.0.0.1, with a token of its all-admins login."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()
        token = requests.get(f"{base}/auth/token", timeout=30).json()["access_token"]
        self.session.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, body: dict[str, Any]) -> requests.Response:
        return self.session.post(f"{self.base}/api/v2{path}", json=body, timeout=60)

    def get(self, path: str, *, api: str = "/api/v2") -> requests.Response:
        return self.session.get(f"{self.base}{api}{path}", timeout=60)

    def delete(self, path: str) -> requests.Response:
        return self.session.delete(f"{self.base}/api/v2{path}", timeout=60)

    def save(self, **fields: Any) -> dict[str, Any]:
        """Save a connection as the form's Save does; return it as the connections list shows it."""
        self.delete(f"/connections/{fields['connection_id']}")
        response = self.post("/connections", {"conn_type": "stopchurn", **fields})
        assert response.status_code == 201, response.text
        shown = self.get(f"/connections/{fields['connection_id']}").json()
        assert shown["password"] == "***"  # what the UI holds is the masked value
        return shown

    def save_with_extra(self, connection_id: str, sandbox: SandboxServer, extra: dict[str, str]) -> dict[str, Any]:
        """Save a connection to ``sandbox`` (port 443, its API key) with ``extra`` as typed in the form."""
        return self.save(
            connection_id=connection_id, host=sandbox.url, port=443, password=sandbox.token, extra=json.dumps(extra)
        )

    def test_like_the_ui(self, shown: dict[str, Any]) -> requests.Response:
        """The Test button of the connections list in Airflow 3.3.2 (its ``TestConnectionButton``)."""
        extra = shown["extra"]
        body = {
            "conn_type": shown["conn_type"],
            "connection_id": shown["connection_id"],
            "description": shown["description"] or "",
            "extra": "{}" if extra in ("", None) else extra,
            "host": shown["host"] or "",
            "login": shown["login"] or "",
            "password": shown["password"] or "",
            "port": int(shown["port"] or 0),  # JavaScript's Number(null) is 0
            "schema": shown["schema"] or "",
        }
        return self.post("/connections/test", body)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def api(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    port = _free_port()
    log = tmp_path_factory.mktemp("api-server") / "api-server.log"
    env = {
        **os.environ,  # AIRFLOW_HOME and the metadata DB of this test session (conftest.py)
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
    }
    command = [sys.executable, "-m", "airflow", "api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen([*command, "--apps", "core"], stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{base}/api/v2/version", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"airflow api-server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Api(base)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_form_shows_the_port_field(api: Api) -> None:
    [meta] = [m for m in api.get("/ui/connections/hook_meta", api="").json() if m["connection_type"] == "stopchurn"]
    port = meta["standard_fields"]["port"]
    assert port["hidden"] is False and port["title"] == "Port (enter 443)"
    assert meta["standard_fields"]["login"]["hidden"] is True


def test_saved_connection_with_port_443_tests_ok(api: Api, stopchurn_sandbox: SandboxServer) -> None:
    shown = api.save(connection_id="sc_form_ok", host=stopchurn_sandbox.url, port=443, password=stopchurn_sandbox.token)
    response = api.test_like_the_ui(shown)
    assert response.status_code == 200, response.text
    assert response.json()["status"] is True, response.json()
    assert "StopChurn accepted the API key" in response.json()["message"]
    assert stopchurn_sandbox.stats()["updates"] == {"insert": 0, "update": 0, "delete": 0}


def test_saved_connection_without_port_hits_airflows_bug(api: Api, stopchurn_sandbox: SandboxServer) -> None:
    """Documents the Airflow 3.3.2 behaviour the port field works around (a fixed Airflow answers 200)."""
    shown = api.save(connection_id="sc_form_noport", host=stopchurn_sandbox.url, password=stopchurn_sandbox.token)
    response = api.test_like_the_ui(shown)
    if response.status_code == 400:
        assert "differs from the stored connection" in response.text
    else:
        assert response.json()["status"] is True, response.text


def test_wrong_key_is_reported_without_a_connection_id(api: Api, stopchurn_sandbox: SandboxServer) -> None:
    shown = api.save(connection_id="sc_form_badkey", host=stopchurn_sandbox.url, port=443, password="wrong-key-1")
    result = api.test_like_the_ui(shown).json()
    assert result["status"] is False
    assert result["message"].startswith("StopChurn refused the API key (401")
    assert "connection '" not in result["message"].lower()  # Airflow tests a copy under a random id


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"brand_id": "abc"}, "Brand id"),
        ({"timeout": "0"}, "Timeout (seconds)"),
        ({"max_retries": "-1"}, "Max retries"),
    ],
)
def test_invalid_extras_are_named(
    api: Api, stopchurn_sandbox: SandboxServer, extra: dict[str, str], field: str
) -> None:
    shown = api.save_with_extra("sc_form_extra", stopchurn_sandbox, extra)
    assert json.loads(shown["extra"]) == extra  # stored as typed, neither null nor clamped
    result = api.test_like_the_ui(shown).json()
    assert result["status"] is False
    assert result["message"].startswith(f"The connection: {field} (extra '{next(iter(extra))}') must be ")
    assert stopchurn_sandbox.stats()["requests"] == 0


def test_unsaved_form_names_no_temporary_id(api: Api, stopchurn_sandbox: SandboxServer) -> None:
    """Testing a form before saving it: the API tests it under a random id, which the message must not show."""
    body = {
        "connection_id": "sc_form_unsaved",
        "conn_type": "stopchurn",
        "host": stopchurn_sandbox.url,
        "password": "",
        "extra": json.dumps({"brand_id": "1"}),
    }
    result = api.post("/connections/test", body).json()
    assert result["status"] is False
    assert result["message"] == (
        "The connection has no StopChurn API key: set it in the connection's password (API key) field."
    )
    body["password"] = stopchurn_sandbox.token
    assert api.post("/connections/test", body).json()["status"] is True


def test_every_bad_extra_is_reported_by_one_test(api: Api, stopchurn_sandbox: SandboxServer) -> None:
    """Saved as typed (the form cannot check numbers), then one Test names every field to fix."""
    extra = {"brand_id": "abc", "timeout": "0", "max_retries": "-1"}
    shown = api.save_with_extra("sc_form_allbad", stopchurn_sandbox, extra)
    result = api.test_like_the_ui(shown).json()
    assert result["status"] is False
    first, *details = result["message"].splitlines()
    assert first == "The connection: 3 extras are invalid (brand_id, timeout, max_retries)."
    assert [line.split(" (extra")[0] for line in details] == ["- Brand id", "- Timeout (seconds)", "- Max retries"]
    assert stopchurn_sandbox.token not in result["message"]
    assert stopchurn_sandbox.stats()["requests"] == 0


def test_the_form_caps_what_each_extra_field_takes(api: Api) -> None:
    """The checks Airflow 3.3's form applies to a text field (maxLength) are declared for each extra."""
    [meta] = [m for m in api.get("/ui/connections/hook_meta", api="").json() if m["connection_type"] == "stopchurn"]
    schemas = {name.rsplit("__", 1)[-1]: field["schema"] for name, field in meta["extra_fields"].items()}
    assert {name: schema.get("maxLength") for name, schema in schemas.items()} == {
        "brand_id": 19,
        "timeout": 12,
        "max_retries": 3,
    }
    assert all(schema["type"] == ["string", "null"] for schema in schemas.values())  # what is typed reaches the hook
