"""The operators' public import path: ``airflow_provider_stopchurn.operators.stopchurn``.

Each operator lives in a module of its own (:mod:`.update`, :mod:`.events`, :mod:`.export`) and what they share
in :mod:`._common` (retries, storage locations, a run's names), :mod:`._source` (the one source-reading path) and
:mod:`._warehouse` (the diff inside the warehouse). This module re-exports their names, so the paths DAGs and
tools import keep working.
"""

from __future__ import annotations

from airflow_provider_stopchurn.operators._common import (  # noqa: F401 - private names kept importable here
    _FALSE_WORDS,
    _TRUE_WORDS,
    RETRY_DEFAULTS,
    _as_bool,
    _configured_default_retries,
    _fail,
    _holder,
    _refusal_recorded,
    _resolve_brand,
    _run_key,
    _storage_root,
    _with_retry_defaults,
    run_info,
    snapshot_root,
)
from airflow_provider_stopchurn.operators._source import (  # noqa: F401 - private names kept importable here
    _accepts,
    _accepts_context,
    _adbc_postgres_uri,
    _is_xcom_arg,
    _SourceArguments,
    read_sql,
)
from airflow_provider_stopchurn.operators._warehouse import (  # noqa: F401 - private names kept importable here
    _SPARK_REFUSAL,
    DEFAULT_STATE_SCHEMA,
    DIFF_LOCATIONS,
    WAREHOUSE_DIALECTS,
    WAREHOUSE_REFUSED,
    _check_diff_location,
    _is_template,
    warehouse_for_connection,
    warehouse_source,
)
from airflow_provider_stopchurn.operators.events import StopChurnEventOperator, _check_event_guard  # noqa: F401
from airflow_provider_stopchurn.operators.export import StopChurnHistoricalExportOperator
from airflow_provider_stopchurn.operators.update import SYNC_OPTION_ARGUMENTS, StopChurnUpdateOperator

__all__ = [
    "DEFAULT_STATE_SCHEMA",
    "DIFF_LOCATIONS",
    "RETRY_DEFAULTS",
    "SYNC_OPTION_ARGUMENTS",
    "WAREHOUSE_DIALECTS",
    "WAREHOUSE_REFUSED",
    "StopChurnEventOperator",
    "StopChurnHistoricalExportOperator",
    "StopChurnUpdateOperator",
    "read_sql",
    "run_info",
    "snapshot_root",
    "warehouse_for_connection",
    "warehouse_source",
]
