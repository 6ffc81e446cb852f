"""The export's output folder: ``<root>/<brand_id>/<table_name>/<run>``, the run under a name a person can type."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from typing import Any

from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.store.folder import safe_name


def output_folder(root: Any, options: ExportOptions) -> Any:
    """``<root>/<brand_id>/<table_name>/<export_folder_name(run id)>`` (a ``pathlib.Path`` or an
    ObjectStoragePath / UPath)."""
    name = export_folder_name(options.run_id, key=options.run_key)
    return root / str(int(options.brand_id)) / safe_name(options.table_name) / name


_UNSAFE_IN_FOLDER = re.compile(r"[^A-Za-z0-9_.-]+")


def export_folder_name(run_id: str, key: str | None = None) -> str:
    """The run's export folder: a name a person can type, the same for every try of one DAG run.

    An Airflow run id ``<kind>__<ISO time>`` gives ``<UTC time>-<kind>-<hash>`` (``20261207T005212Z-manual-3f9a1c``);
    any other run id its letters, digits, ``_`` and ``.`` (the rest as ``-``, cut to 40 characters), then the hash.
    The hash (6 hex digits of the SHA-256 of ``key``, the task run's ``run_key``: DAG, task, run id and map index;
    of the run id when None) keeps two runs apart whose names would otherwise meet: two triggers in one second, or
    two DAGs on one schedule (their run ids are the same). The folder depends on the task run alone, so a retry
    rewrites its own folder.
    """
    digest = hashlib.sha256((run_id if key is None else key).encode("utf-8")).hexdigest()[:6]
    kind, sep, stamp = run_id.rpartition("__")
    if sep:
        try:
            at = dt.datetime.fromisoformat(stamp)
        except ValueError:
            at = None
        readable_kind = _UNSAFE_IN_FOLDER.sub("-", kind).strip("-.")[:24]
        if at is not None and at.tzinfo is not None and readable_kind:
            utc = at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            return f"{utc}-{readable_kind}-{digest}"
    readable = _UNSAFE_IN_FOLDER.sub("-", run_id).strip("-.")[:40].rstrip("-.")
    return f"{readable or 'run'}-{digest}"


__all__ = ["export_folder_name", "output_folder"]
