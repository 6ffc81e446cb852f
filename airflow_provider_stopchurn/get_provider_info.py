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
                "python-modules": ["airflow_provider_stopchurn.operators.stopchurn"],
            }
        ],
        # `airflow stopchurn ...`: Airflow 3.2+ calls these functions for the provider's CLI command groups
        "cli": ["airflow_provider_stopchurn.cli.airflow_cli_commands"],
        "connection-types": [
            {
                "connection-type": "stopchurn",
                "hook-class-name": "airflow_provider_stopchurn.hooks.stopchurn.StopChurnHook",
                "hook-name": "StopChurn",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"host": "API base URL", "password": "API key"},
                    "placeholders": {
                        "host": "https://marketplace.stopchurn.com",
                        "password": "StopChurn API key (Back Office > Settings)",
                    },
                },
                "conn-fields": {
                    "brand_id": {
                        "label": "Brand id",
                        "schema": {"type": ["integer", "null"]},
                        "description": "Default StopChurn brand id for operators that do not set brand_id.",
                    },
                    "timeout": {
                        "label": "Timeout (seconds)",
                        "schema": {"type": ["number", "null"], "minimum": 1},
                        "description": "Read timeout of one request; the connect timeout is min(10, timeout).",
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "schema": {"type": ["integer", "null"], "minimum": 0},
                        "description": "Retries of one request on 429, 5xx and network errors.",
                    },
                },
            }
        ],
    }
