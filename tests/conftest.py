"""Test-wide set-up.

Every ``AIRFLOW_*`` variable must be set before the first ``import airflow`` anywhere in the process, so this
module sets them at import time: a throwaway AIRFLOW_HOME with its own SQLite metadata DB, no example DAGs, and
the project's ``example_dags/`` as the DAGs folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="stopchurn-airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "example_dags")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")

pytest_plugins = [
    "airflow_provider_stopchurn.sandbox.pytest_plugin",
    "pg_plugin",
    "mysql_plugin",
    "airflow_plugin",
    "spark_session",
    "engine_fixtures",
    "leak_scan",
]
