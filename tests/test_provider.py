"""The provider as Airflow 3.3 discovers it: entry point, hook, connection form (conn-fields, behaviour)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from airflow_provider_stopchurn import __version__
from airflow_provider_stopchurn.get_provider_info import get_provider_info

PACKAGE = "airflow-provider-stopchurn"
HOOK_CLASS = "airflow_provider_stopchurn.hooks.stopchurn.StopChurnHook"


def _airflow(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),  # AIRFLOW_HOME & co. from conftest
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_provider_info_validates_against_airflows_schemas() -> None:
    import importlib.resources

    import jsonschema

    info = get_provider_info()
    assert info["versions"] == [__version__]
    airflow_files = importlib.resources.files("airflow")
    runtime_schema = json.loads((airflow_files / "provider_info.schema.json").read_text())
    jsonschema.validate(info, runtime_schema)
    # The stricter provider.yaml schema defines the conn-fields / ui-field-behaviour form.
    yaml_schema = json.loads((airflow_files / "provider.yaml.schema.json").read_text())
    jsonschema.validate(info["connection-types"], yaml_schema["properties"]["connection-types"])


def test_providers_manager_sees_the_provider() -> None:
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    assert pm.providers[PACKAGE].version == __version__
    assert pm.field_behaviours["stopchurn"] == {
        "hidden_fields": ["schema", "login"],  # the port stays: Airflow 3.3.2's Test button needs a stored one
        "relabeling": {"host": "API base URL", "password": "API key", "port": "Port (enter 443)"},
        "placeholders": {
            "host": "https://marketplace.stopchurn.com",
            "password": "StopChurn API key (Back Office > Settings)",
        },
    }
    widgets = {k: v for k, v in pm.connection_form_widgets.items() if k.startswith("extra__stopchurn__")}
    assert sorted(w.field_name for w in widgets.values()) == ["brand_id", "max_retries", "timeout"]
    # text fields: what is typed reaches the hook, which names a bad value's field (see test_hook.py)
    assert {w.field["schema"]["type"] == ["string", "null"] for w in widgets.values()} == {True}
    assert {w.hook_class_name for w in widgets.values()} == {HOOK_CLASS}


def test_task_runtime_providers_manager_has_the_hook() -> None:
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    info = ProvidersManagerTaskRuntime().hooks["stopchurn"]
    assert info is not None
    assert info.hook_class_name == HOOK_CLASS
    assert info.connection_id_attribute_name == "stopchurn_conn_id"
    assert info.hook_name == "StopChurn"
    assert info.connection_testable


def test_ui_connection_form_metadata() -> None:
    """What the Airflow 3.3 UI receives: extra fields keyed by their plain name (stored so in the extra)."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    [meta] = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "stopchurn"]
    assert meta.hook_name == "StopChurn"
    assert sorted(meta.extra_fields or {}) == ["brand_id", "max_retries", "timeout"]
    fields = meta.standard_fields
    assert fields is not None
    assert fields.password is not None and fields.password.title == "API key"
    assert fields.login is not None and fields.login.hidden
    assert fields.port is not None and not fields.port.hidden
    assert fields.port.title == "Port (enter 443)"


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (("providers", "hooks", "-o", "json"), HOOK_CLASS),
        (("providers", "behaviours", "-o", "json"), "stopchurn"),
    ],
)
def test_airflow_cli_lists_the_provider(command: tuple[str, ...], needle: str) -> None:
    out = _airflow(*command)
    rows = json.loads(out[out.index("[") :])
    assert any(needle in json.dumps(row) for row in rows)


def test_airflow_cli_providers_list() -> None:
    out = _airflow("providers", "list", "-o", "json")
    rows = json.loads(out[out.index("[") :])
    assert {"package_name": PACKAGE, "version": __version__}.items() <= next(
        r for r in rows if r["package_name"] == PACKAGE
    ).items()
