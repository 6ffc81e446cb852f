"""What a sync tells Airflow about its data: the asset event of its table and its OpenLineage metadata.

* **Asset events.** A task that declares ``outlets=[stopchurn_asset(brand_id, table_name)]`` gets, on success,
  the run's counts in the extra of that asset's event (:data:`EVENT_EXTRA_KEYS`); a DAG scheduled on the asset
  reads them from ``triggering_asset_events``. Only counts: no rejected ids or reasons, no snapshot location,
  never a key.
* **OpenLineage** (when ``apache-airflow-providers-openlineage`` is installed; nothing here imports it
  otherwise): inputs are the tables the SQL source reads (common.sql's parser, with the connection's
  database info where its hook gives one) and the task's ``inlets`` that OpenLineage can name; the output is
  the StopChurn table (``stopchurn://<api host>``, ``<brand_id>/<table_name>``) with the standard
  ``outputStatistics`` facet (rows changed, bytes sent) and a ``stopchurn_sync`` run facet with the counts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from airflow.sdk import Asset, BaseHook

from airflow_provider_stopchurn.assets import DEFAULT_HOST, TableRef, openlineage_name, parse_asset_uri, table_ref

log = logging.getLogger(__name__)

#: The summary fields copied into the asset event's extra and the ``stopchurn_sync`` lineage facet.
EVENT_EXTRA_KEYS = (
    "brand_id",
    "table_name",
    "inserted",
    "updated",
    "deleted",
    "unchanged",
    "quarantined",
    "chunks",
    "bytes",
    "requests",
    "retries",
    "settled_chunks",
    "dry_run",
    "baseline",
    "duration_s",
)


def sync_table(api_host: str | None, brand_id: int, table_name: str, outlets: Iterable[Any] = ()) -> TableRef | None:
    """The table a run updates, for lineage: as a ``stopchurn`` outlet of the task names it (so that lineage and
    Airflow's asset graph agree), else under the host of the StopChurn connection; None if it cannot be named."""
    for outlet in outlets:
        ref = parse_asset_uri(outlet.uri) if isinstance(outlet, Asset) else None
        if ref is not None and (ref.brand_id, ref.table_name) == (brand_id, table_name):
            return ref
    try:
        return table_ref(brand_id, table_name, api_host or DEFAULT_HOST)
    except ValueError:
        return None


def counts(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {key: summary[key] for key in EVENT_EXTRA_KEYS if key in summary}


def attach_counts(outlets: Iterable[Any], outlet_events: Any, summary: Mapping[str, Any]) -> None:
    """Put the run's counts in the event extra of every ``stopchurn`` outlet naming this brand and table.

    The asset's host is not compared: a DAG names the production table even when a test connection points
    elsewhere. An outlet naming another table gets no counts (and a warning).
    """
    if outlet_events is None:
        return  # execute() called outside a task run
    for outlet in outlets:
        ref = parse_asset_uri(outlet.uri) if isinstance(outlet, Asset) else None
        if ref is None:
            continue
        if (ref.brand_id, ref.table_name) != (summary.get("brand_id"), summary.get("table_name")):
            log.warning(
                "Outlet %s names another StopChurn table than this task's (brand %s table %r): no counts attached.",
                outlet.uri,
                summary.get("brand_id"),
                summary.get("table_name"),
            )
            continue
        outlet_events[outlet].extra.update(counts(summary))


# --- OpenLineage ---------------------------------------------------------------------------------------------
def operator_lineage(operator: Any, table: TableRef | None, summary: Mapping[str, Any] | None) -> Any:
    """The ``OperatorLineage`` of a sync task (None without the OpenLineage provider)."""
    try:
        from airflow.providers.common.compat.openlineage.facet import (
            OutputDataset,
            OutputStatisticsOutputDatasetFacet,
            RunFacet,
        )
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None
    lineage: Any = OperatorLineage()
    if getattr(operator, "sql", None):
        sql_lineage = _sql_lineage(operator)
        if sql_lineage is not None:
            lineage.inputs.extend(sql_lineage.inputs)
            lineage.job_facets.update(sql_lineage.job_facets)
            lineage.run_facets.update(sql_lineage.run_facets)
    lineage.inputs.extend(_inlet_datasets(getattr(operator, "inlets", None) or []))
    if table is not None:
        namespace, name = openlineage_name(table)
        output_facets: dict[str, Any] = {}
        if summary is not None:
            changed = int(summary.get("inserted", 0)) + int(summary.get("updated", 0)) + int(summary.get("deleted", 0))
            output_facets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(
                rowCount=changed, size=int(summary.get("bytes", 0))
            )
        lineage.outputs.append(OutputDataset(namespace=namespace, name=name, outputFacets=output_facets))
    if summary is not None:
        lineage.run_facets["stopchurn_sync"] = RunFacet().with_additional_properties(**counts(summary))
    return lineage


def _sql_lineage(operator: Any) -> Any:
    """Inputs (and the ``sql`` job facet) of the SQL source; never queries the database."""
    try:
        from airflow.providers.openlineage.sqlparser import SQLParser, get_openlineage_facets_with_sql

        hook = BaseHook.get_connection(operator.sql_conn_id).get_hook(hook_params=operator.sql_hook_params)
        found = get_openlineage_facets_with_sql(
            hook, operator.sql, operator.sql_conn_id, database=None, use_connection=False
        )
        if found is not None:
            return found
        # No database info from this hook (SQLite, ...): the parser's table names under the connection's URI.
        from airflow.providers.openlineage.extractors import OperatorLineage

        conn = hook.get_connection(operator.sql_conn_id)
        dialect = conn.conn_type if conn.conn_type in _PARSER_DIALECTS else "generic"
        parser = SQLParser(dialect=dialect)
        parsed = parser.parse(parser.split_sql_string(operator.sql))
        if not parsed:
            return None
        namespace = f"{conn.conn_type}://{conn.host or ''}" + (f":{conn.port}" if conn.port else "")
        return OperatorLineage(inputs=[_dataset(namespace, t.qualified_name) for t in parsed.in_tables])
    except Exception as err:  # lineage never fails a task
        log.debug("No OpenLineage inputs from the SQL source: %s", err)
        return None


_PARSER_DIALECTS = {"bigquery", "databricks", "hive", "mssql", "mysql", "postgres", "redshift", "snowflake", "sqlite"}


def _dataset(namespace: str, name: str) -> Any:
    from airflow.providers.common.compat.openlineage.facet import Dataset

    return Dataset(namespace=namespace, name=name)


def _inlet_datasets(inlets: Iterable[Any]) -> list[Any]:
    """The task's asset inlets that OpenLineage can name (assets whose URI scheme has a converter)."""
    try:
        from airflow.providers.openlineage.utils.utils import translate_airflow_asset
    except ImportError:
        return []
    datasets = []
    for inlet in inlets:
        if isinstance(inlet, Asset) and (dataset := translate_airflow_asset(inlet, None)) is not None:
            datasets.append(dataset)
    return datasets


__all__ = ["EVENT_EXTRA_KEYS", "attach_counts", "counts", "operator_lineage", "sync_table"]
