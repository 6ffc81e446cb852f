"""The provider as Airflow discovers it: entry point, hook, connection form (conn-fields, behaviour).

Airflow 3.2+ reads the connection form from ``conn-fields`` / ``ui-field-behaviour`` in the provider info;
3.1 asks the hook (``get_connection_form_widgets`` / ``get_ui_field_behaviour``). Both must give the same form.
These tests run on every supported Airflow (``make test-matrix``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from airflow_plugin import airflow_version

from airflow_provider_stopchurn import __version__
from airflow_provider_stopchurn.get_provider_info import get_provider_info

pytestmark = pytest.mark.matrix

PACKAGE = "airflow-provider-stopchurn"
#: Airflow reads the connection form from the provider info (conn-fields) from 3.2 on.
DECLARATIVE_FORM = airflow_version() >= (3, 2)
HOOK_CLASS = "airflow_provider_stopchurn.hooks.stopchurn.StopChurnHook"


def _airflow(*args: str) -> str:
    return _run("-m", "airflow", *args)


def _python(code: str) -> str:
    return _run("-c", code)


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
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

    from airflow_provider_stopchurn.hooks.stopchurn import StopChurnHook

    pm = ProvidersManager()
    assert pm.providers[PACKAGE].version == __version__
    behaviour = {
        "hidden_fields": ["schema", "login"],  # the port stays: Airflow 3.3.2's Test button needs a stored one
        "relabeling": {"host": "API base URL", "password": "API key", "port": "Port (enter 443)"},
        "placeholders": {
            "host": "https://marketplace.stopchurn.com",
            "password": "StopChurn API key (Back Office > Settings)",
        },
    }
    assert StopChurnHook.get_ui_field_behaviour() == behaviour  # what Airflow before 3.2 asks the hook for
    # Before 3.2 Airflow loads form behaviours and widgets only where WTForms can be imported (its UI brings
    # stand-ins: test_ui_connection_form_metadata); 3.2+ reads them from the provider info everywhere.
    if DECLARATIVE_FORM:
        assert pm.field_behaviours["stopchurn"] == behaviour
        widgets = {k: v for k, v in pm.connection_form_widgets.items() if k.startswith("extra__stopchurn__")}
        assert sorted(w.field_name for w in widgets.values()) == ["brand_id", "max_retries", "timeout"]
        # text fields: what is typed reaches the hook, which names a bad value's field (see test_hook.py)
        assert {w.field["schema"]["type"] == ["string", "null"] for w in widgets.values()} == {True}
        assert {w.hook_class_name for w in widgets.values()} == {HOOK_CLASS}


def test_task_runtime_providers_manager_has_the_hook() -> None:
    try:
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

        hooks = ProvidersManagerTaskRuntime().hooks
    except ImportError:  # before 3.2 tasks use the one ProvidersManager
        from airflow.providers_manager import ProvidersManager

        hooks = ProvidersManager().hooks
    info = hooks["stopchurn"]
    assert info is not None
    assert info.hook_class_name == HOOK_CLASS
    assert info.connection_id_attribute_name == "stopchurn_conn_id"
    assert info.hook_name == "StopChurn"
    assert info.connection_testable


# What the UI's connection form receives, in a fresh interpreter: Airflow before 3.2 builds it the first time
# its ProvidersManager loads the hooks, which a test run in this process may already have done without the UI.
_HOOK_META = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
    [meta] = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "stopchurn"]
print(json.dumps({
    "meta": meta.model_dump(mode="json"),
    "warnings": [str(w.message) for w in caught if "StopChurnHook" in str(w.message)],
}))
"""


def test_ui_connection_form_metadata() -> None:
    """The form every supported Airflow UI shows: extra fields keyed by their plain name (stored so in the
    extra), relabelled and hidden standard fields, and no deprecation warning about the hook on 3.2+."""
    out = json.loads(_python(_HOOK_META).strip().splitlines()[-1])
    meta = out["meta"]
    assert meta["hook_name"] == "StopChurn"
    extra = meta["extra_fields"] or {}
    assert sorted(extra) == ["brand_id", "max_retries", "timeout"]
    titles = {name: field["schema"]["title"] for name, field in extra.items()}
    assert titles == {"brand_id": "Brand id", "max_retries": "Max retries", "timeout": "Timeout (seconds)"}
    # text fields on every version: what is typed reaches the hook, which names a bad value's field
    assert {name: field["schema"]["type"] for name, field in extra.items()} == {
        name: ["string", "null"] for name in extra
    }
    assert "brand id" in extra["brand_id"]["description"]
    fields = meta["standard_fields"]
    assert fields["password"]["title"] == "API key"
    assert fields["host"]["title"] == "API base URL"
    assert fields["login"]["hidden"] and fields["url_schema"]["hidden"]
    assert not fields["port"]["hidden"] and fields["port"]["title"] == "Port (enter 443)"
    assert out["warnings"] == []  # 3.2+ never calls the hook's form methods when the provider info has the form


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (("providers", "hooks", "-o", "json"), HOOK_CLASS),
        pytest.param(
            ("providers", "behaviours", "-o", "json"),
            "stopchurn",
            marks=pytest.mark.skipif(
                not DECLARATIVE_FORM, reason="Airflow < 3.2 lists form behaviours only with FAB installed"
            ),
        ),
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
