"""What a DataFrame churn run reads of the committed snapshot: each part once, counted where the reads happen (the
object store's downloads, polars' Parquet scans), and the source modules sharing only public names.

A churn run of the whole (in-memory) path needs the snapshot's key columns (the key match), its createdAt and row
hashes (the states) and the rows of the deleted keys. The key columns were decoded again for the diff after the
validation read had decoded them, and the deleted rows were found by a second join of their keys against the
file's key column, although the key match had given their positions.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import fsspec
import pandas as pd
import polars as pl
from fsspec.implementations.local import LocalFileSystem
from helpers_sync import BRAND, T0, TABLE, make_client, options
from killswitch_fs import quiet_upath

from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.plan import make_plan
from airflow_provider_stopchurn.update.sync import canonical_source, run_sync

PACKAGE = Path(__file__).resolve().parent.parent / "airflow_provider_stopchurn"


class CountingObjects(LocalFileSystem):
    """An object store whose objects are local files (``countingobjects:///abs/folder``), counting each download
    of a snapshot file (every read of one opens it whole: objects are fetched, not mapped)."""

    protocol = ("countingobjects",)
    snapshot_reads: ClassVar[list[str]] = []

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return super()._strip_protocol(str(path).removeprefix("countingobjects://"))

    def _open(self, path: Any, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode and "/snapshots/" in str(path) and str(path).endswith(".parquet"):
            CountingObjects.snapshot_reads.append(str(path))
        return super()._open(path, mode, *args, **kwargs)


fsspec.register_implementation("countingobjects", CountingObjects, clobber=True)


def _table(rows: int, *, churned: bool) -> pd.DataFrame:
    """``rows`` customers; churned: every 7th deleted, every 5th's score changed, two new ones."""
    frame = pd.DataFrame(
        {
            "id": range(rows),
            "score": [float(k % 11) for k in range(rows)],
            "prefs": [{"sms": k % 2 == 0, "tier": k % 3} for k in range(rows)],
        }
    )
    if not churned:
        return frame
    frame.loc[frame["id"] % 5 == 0, "score"] += 0.5
    frame = frame[frame["id"] % 7 != 3]
    extra = pd.DataFrame({"id": [rows, rows + 1], "score": [1.0, 2.0], "prefs": [{"sms": True}, {}]})
    return pd.concat([frame, extra], ignore_index=True)


def test_a_dataframe_churn_run_downloads_the_committed_snapshot_once_per_part_it_needs(
    tmp_path: Path, stopchurn_sandbox: SandboxServer
) -> None:
    """Each read of an object store's snapshot downloads the whole file. A churn run read it five times: the key
    columns twice to check the file (before and after settling a pending plan), the key columns again for the
    diff's key match, the states, and the deleted rows. The keys the second check read now serve the key match."""
    store = SnapshotStore(quiet_upath(f"countingobjects://{tmp_path}/objects"), BRAND, TABLE)
    run_sync(_table(700, churned=False), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    CountingObjects.snapshot_reads.clear()
    summary = run_sync(_table(700, churned=True), store, make_client(stopchurn_sandbox), options(), run_ms=T0 + 1)
    assert (summary.inserted, summary.updated, summary.deleted) == (2, 120, 100)
    files = set(CountingObjects.snapshot_reads)
    assert len(files) == 1, files  # only the committed snapshot is read (the target is written)
    assert len(CountingObjects.snapshot_reads) <= 4, CountingObjects.snapshot_reads


def test_the_deleted_rows_are_read_at_the_positions_the_key_match_found(
    tmp_path: Path, stopchurn_sandbox: SandboxServer
) -> None:
    """The deleted rows were found by joining their keys against the snapshot's key column once more (a scan of
    the file's keys beside the scans of the row groups holding them); their positions are known from the key
    match, so only the row groups holding them are scanned."""
    store = SnapshotStore(tmp_path / "store", BRAND, TABLE)
    run_sync(_table(700, churned=False), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    with mock.patch("polars.scan_parquet", autospec=True, side_effect=pl.scan_parquet) as scans:
        summary = run_sync(_table(700, churned=True), store, make_client(stopchurn_sandbox), options(), run_ms=T0 + 1)
    assert (summary.inserted, summary.updated, summary.deleted) == (2, 120, 100)
    assert scans.call_count == 1  # the one row group holding the deleted rows; no scan of the keys


def test_kept_keys_a_plan_never_asks_for_are_not_held_through_the_diff_and_the_delivery(
    tmp_path: Path, stopchurn_sandbox: SandboxServer
) -> None:
    """A run whose key columns changed (``on_schema_change='update_all'``) matches the source by its new key
    columns, so the snapshot's old key columns, kept by the file's check, are never asked for: they stayed in
    memory beside the new ones through the key match, and for as long as the run held the committed snapshot (its
    whole delivery). Whatever the plan reads first takes them or drops them."""
    store = SnapshotStore(quiet_upath(f"countingobjects://{tmp_path}/objects"), BRAND, TABLE)
    first = options(key_columns=["tenant", "id"])
    run_sync(_table(70, churned=False).assign(tenant="t"), store, make_client(stopchurn_sandbox), first, run_ms=T0)
    opts = options(key_columns=["id"], on_schema_change="update_all")
    canon = canonical_source(_table(70, churned=True).assign(tenant="t"), opts)
    committed = store.read_committed(keep_keys=True)
    assert committed is not None and committed.key_columns == ("tenant", "id")
    plan = make_plan(canon, committed, opts, T0 + 1)
    assert (plan.inserted, plan.deleted) == (2, 10)
    CountingObjects.snapshot_reads.clear()
    assert committed.columns(["tenant", "id"]).height == 70
    assert len(CountingObjects.snapshot_reads) == 1, "the old key columns were still held after the plan"


def _private_imports(module: Path, origins: set[str]) -> list[str]:
    """``from <origin> import _name`` in ``module``, for the package modules ``origins``."""
    found = []
    for node in ast.walk(ast.parse(module.read_text(), str(module))):
        if isinstance(node, ast.ImportFrom) and node.module in origins:
            found += [f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
    return found


def test_the_helpers_the_source_modules_share_are_public() -> None:
    """canonical.py took three private helpers of frame.py, json_columns.py two of arrow_values.py, dbapi_rows.py
    one of frame.py: what a module shares is public (named without an underscore, documented)."""
    origins = {"airflow_provider_stopchurn.source.frame", "airflow_provider_stopchurn.source.arrow_values"}
    importers = ("canonical.py", "json_columns.py", "dbapi_rows.py")
    offenders = {
        str(path.relative_to(PACKAGE)): found
        for path in sorted((PACKAGE / "source" / name) for name in importers)
        if (found := _private_imports(path, origins))
    }
    assert offenders == {}
