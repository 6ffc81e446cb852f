"""The ``stopchurn://`` asset URI of a StopChurn table, without Airflow: build, parse, normalize.

``stopchurn://<host>/<brand_id>/<table_name>`` names one table of one brand on one StopChurn API host, e.g.
``stopchurn://marketplace.stopchurn.com/1/user``. The host is the API's host name (lower case, with a port only
when it is not 443), the brand id a positive integer, the table name percent-encoded. Airflow calls
:func:`sanitize_uri` (registered under ``asset-uris`` in the provider info) on every such URI, so two spellings
of one table (``STOPCHURN://Marketplace.StopChurn.com:443/01/user/``) are one asset. OpenLineage names the same
table ``namespace="stopchurn://<host>"``, ``name="<brand_id>/<table_name>"`` (:func:`openlineage_name`).

The Airflow side (the ``Asset`` factory, the OpenLineage converter) is in
:mod:`airflow_provider_stopchurn.hooks.assets`.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import SplitResult, quote, unquote, urlsplit

SCHEME = "stopchurn"
#: StopChurn's production API host, the default of every asset.
DEFAULT_HOST = "marketplace.stopchurn.com"


class TableRef(NamedTuple):
    """One StopChurn table: API host, brand, table."""

    host: str
    brand_id: int
    table_name: str


def _host(value: str) -> str:
    """``value`` (a host, ``host:port`` or a base URL) as the URI's host: lower case, no default port."""
    text = value.strip()
    parts = urlsplit(text if "://" in text else f"//{text}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"A StopChurn asset's host carries no credentials: {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"A StopChurn asset's host must be a host name, optionally with a port: {value!r}")
    hostname = (parts.hostname or "").rstrip(".")
    if not hostname:
        raise ValueError(f"A StopChurn asset needs a host, got {value!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"Invalid port in StopChurn asset host {value!r}") from None
    if ":" in hostname:  # an IPv6 literal
        hostname = f"[{hostname}]"
    return hostname if port in (None, 443) else f"{hostname}:{port}"


def _brand(value: object) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"A StopChurn brand id is an integer >= 1, got {value!r}")
    return int(text)


def table_ref(brand_id: int | str, table_name: str, host: str = DEFAULT_HOST) -> TableRef:
    """A checked :class:`TableRef`; ``host`` may be a host name, ``host:port`` or an API base URL."""
    if not isinstance(table_name, str) or not table_name.strip():
        raise ValueError(f"A StopChurn table name is a non-empty string, got {table_name!r}")
    return TableRef(_host(host or DEFAULT_HOST), _brand(brand_id), table_name)


def asset_uri(brand_id: int | str, table_name: str, host: str = DEFAULT_HOST) -> str:
    """``stopchurn://<host>/<brand_id>/<table_name>``, normalized."""
    ref = table_ref(brand_id, table_name, host)
    return f"{SCHEME}://{ref.host}/{ref.brand_id}/{quote(ref.table_name, safe='')}"


def parse_asset_uri(uri: str) -> TableRef | None:
    """The table a ``stopchurn://`` URI names, or None when ``uri`` is not one (another scheme, a bad path)."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != SCHEME:
        return None
    try:
        return _parse(parts)
    except ValueError:
        return None


def _parse(parts: SplitResult) -> TableRef:
    if not parts.netloc:
        raise ValueError("A StopChurn asset URI needs a host: stopchurn://<host>/<brand_id>/<table_name>")
    if parts.query or parts.fragment:
        raise ValueError(f"A StopChurn asset URI has no query or fragment, got {parts.geturl()!r}")
    segments = parts.path.removeprefix("/").removesuffix("/").split("/")
    if len(segments) != 2 or not all(segments):
        raise ValueError(f"A StopChurn asset URI is stopchurn://<host>/<brand_id>/<table_name>, got {parts.geturl()!r}")
    return table_ref(segments[0], unquote(segments[1]), parts.netloc)


def sanitize_uri(uri: SplitResult) -> SplitResult:
    """Airflow's URI normalizer for ``stopchurn``: one spelling per table; ValueError for a malformed URI."""
    ref = _parse(uri)
    return urlsplit(asset_uri(ref.brand_id, ref.table_name, ref.host))


def openlineage_name(ref: TableRef) -> tuple[str, str]:
    """``(namespace, name)`` of the table as an OpenLineage dataset: ``("stopchurn://<host>", "<brand>/<table>")``."""
    return f"{SCHEME}://{ref.host}", f"{ref.brand_id}/{ref.table_name}"


__all__ = [
    "DEFAULT_HOST",
    "SCHEME",
    "TableRef",
    "asset_uri",
    "openlineage_name",
    "parse_asset_uri",
    "sanitize_uri",
    "table_ref",
]
