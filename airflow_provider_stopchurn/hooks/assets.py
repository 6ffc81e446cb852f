"""StopChurn tables as Airflow assets (``stopchurn://<host>/<brand_id>/<table_name>``) and OpenLineage datasets.

``stopchurn_asset(1, "user")`` is the asset a sync task declares in ``outlets`` and a downstream DAG schedules
on; on success the operator attaches the run's counts to its asset event. The URI itself is built, parsed and
normalized without Airflow, in :mod:`airflow_provider_stopchurn.assets`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset

from airflow_provider_stopchurn.assets import DEFAULT_HOST, asset_uri, openlineage_name, parse_asset_uri

if TYPE_CHECKING:
    from airflow.providers.common.compat.openlineage.facet import Dataset as OpenLineageDataset

__all__ = ["convert_asset_to_openlineage", "create_asset", "stopchurn_asset"]


def stopchurn_asset(
    brand_id: int | str, table_name: str, host: str = DEFAULT_HOST, *, extra: dict[str, Any] | None = None
) -> Asset:
    """The Airflow asset of StopChurn table ``table_name`` of brand ``brand_id``.

    :param brand_id: the StopChurn brand (an integer >= 1).
    :param table_name: the StopChurn table.
    :param host: the StopChurn API host (a host name, ``host:port`` or the connection's base URL); default
        production, ``marketplace.stopchurn.com``. It names the asset: a DAG scheduled on the asset must use the
        same host as the task that updates it.
    :param extra: the asset's own extra (not the events').
    """
    return Asset(uri=asset_uri(brand_id, table_name, host), extra=extra)


def create_asset(
    *, brand_id: int | str, table_name: str, host: str = DEFAULT_HOST, extra: dict[str, Any] | None = None
) -> Asset:
    """The ``stopchurn`` asset factory registered with Airflow (``asset-uris`` in the provider info)."""
    return stopchurn_asset(brand_id, table_name, host, extra=extra)


def convert_asset_to_openlineage(asset: Asset, lineage_context: Any = None) -> OpenLineageDataset:
    """The OpenLineage dataset of a ``stopchurn`` asset: namespace ``stopchurn://<host>``, name ``<brand>/<table>``."""
    from airflow.providers.common.compat.openlineage.facet import Dataset as OpenLineageDataset

    ref = parse_asset_uri(asset.uri)
    if ref is None:
        raise ValueError(f"Not a StopChurn table asset: {asset.uri!r}")
    namespace, name = openlineage_name(ref)
    return OpenLineageDataset(namespace=namespace, name=name)
