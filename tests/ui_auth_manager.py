"""An auth manager for the UI tests: Airflow's SimpleAuthManager, with one user kept out of some DAGs.

The API server of the browser test runs with ``[core] auth_manager = ui_auth_manager.DagFilteringAuthManager``.
Everything is SimpleAuthManager's (login page, users from ``[core] simple_auth_manager_users``, the generated
password file), except that user ``outsider`` may not read the DAGs whose id starts with ``ui_private_``. Airflow's
own pages then hide those DAGs from that user, and the StopChurn page must hide their syncs too.
"""

from __future__ import annotations

from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

RESTRICTED_USER = "outsider"
PRIVATE_PREFIX = "ui_private_"


class DagFilteringAuthManager(SimpleAuthManager):
    def is_authorized_dag(self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None) -> bool:
        dag_id = getattr(details, "id", None) or ""
        if user.get_name() == RESTRICTED_USER and dag_id.startswith(PRIVATE_PREFIX):
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)
