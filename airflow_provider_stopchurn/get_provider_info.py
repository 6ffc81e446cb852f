"""Provider metadata read by Airflow's ProvidersManager through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_provider_stopchurn import __version__


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-stopchurn",
        "name": "StopChurn",
        "description": "Keeps StopChurn tables in step with your own data (`StopChurn <https://stopchurn.com/>`__).",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "StopChurn",
                "external-doc-url": "https://stopchurn.com/docs",
                "tags": ["service"],
            }
        ],
        "hooks": [
            {
                "integration-name": "StopChurn",
                "python-modules": ["airflow_provider_stopchurn.hooks.stopchurn"],
            }
        ],
        "operators": [
            {
                "integration-name": "StopChurn",
                # one module per operator; operators.stopchurn re-exports the three for DAGs that import it
                "python-modules": [
                    "airflow_provider_stopchurn.operators.update",
                    "airflow_provider_stopchurn.operators.events",
                    "airflow_provider_stopchurn.operators.export",
                ],
            }
        ],
        # `airflow stopchurn ...`: Airflow 3.2+ calls these functions for the provider's CLI command groups
        "cli": ["airflow_provider_stopchurn.cli.airflow_cli_commands"],
        "asset-uris": [
            {
                "schemes": ["stopchurn"],
                "handler": "airflow_provider_stopchurn.assets.sanitize_uri",
                "factory": "airflow_provider_stopchurn.hooks.assets.create_asset",
                "to_openlineage_converter": "airflow_provider_stopchurn.hooks.assets.convert_asset_to_openlineage",
            }
        ],
        "connection-types": [
            {
                "connection-type": "stopchurn",
                "hook-class-name": "airflow_provider_stopchurn.hooks.stopchurn.StopChurnHook",
                "hook-name": "StopChurn",
                "ui-field-behaviour": {
                    # The port stays visible: Airflow 3.3.2's Test button sends "port": 0 for an empty port and
                    # its API then refuses to test the saved connection (400); a stored 443 makes them agree.
                    "hidden-fields": ["schema", "login"],
                    "relabeling": {"host": "API base URL", "password": "API key", "port": "Port (enter 443)"},
                    "placeholders": {
                        "host": "https://marketplace.stopchurn.com",
                        "password": "StopChurn API key (Back Office > Settings)",
                    },
                },
                # Text fields: what is typed reaches the hook, which refuses every bad value at once naming its
                # field (a number field would save "abc" as null and clamp "-1" without a word). Of the schema's
                # checks, Airflow 3.3's form honours on a text field only minLength/maxLength (and examples, a
                # suggestion list): `pattern`, `minimum` and `maximum` are not checked there, and nothing is
                # checked when a connection is saved. So the form caps each field's length and the hook checks
                # the rest (the connections list's Test, and every task).
                "conn-fields": {
                    "brand_id": {
                        "label": "Brand id",
                        "schema": {"type": ["string", "null"], "maxLength": 19},
                        "description": "Default StopChurn brand id (an integer >= 1) for operators that do not "
                        "set brand_id.",
                    },
                    "timeout": {
                        "label": "Timeout (seconds)",
                        "schema": {"type": ["string", "null"], "maxLength": 12},
                        "description": "Read timeout of one request, in seconds (> 0; default 30); the connect "
                        "timeout is min(10, timeout).",
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "schema": {"type": ["string", "null"], "maxLength": 3},
                        "description": "Retries of one request on 429, 5xx and network errors (an integer >= 0; "
                        "default 5).",
                    },
                },
            }
        ],
    }
