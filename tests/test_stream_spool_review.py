"""The streamed path's spool on shapes its own tests leave out.

- A source with no ``id`` column (the id derived from its key columns, one or several) is hashed once, as it is
  spooled, like a source with an ``id``: the kinds a batch was spooled with name its columns only, the final kinds
  also the derived ``id``. The hashes reused with the derived ``id`` stand for their rows: both paths plan, send and
  commit the same, run after run, kinds moving between batches.
- A plan taken by the whole path from the spool (a schema change, key columns of another type) holds its rows in
  its own memory, not in the spool files mapped: the spool, removed when the plan is made, then frees its disk at
  once, not only when the plan is dropped after the last request was sent.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers_sync import BRAND, T0, TABLE, make_client, options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal
from test_streamed_worker_path import Source, _check_runs, sources

from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import HASH_1, HASH_2, SnapshotStore
from airflow_provider_stopchurn.update.diff import with_hashes
from airflow_provider_stopchurn.update.stream import SPOOL_ROWS, STREAM_ENV, StreamedPlan, plan_streamed
from airflow_provider_stopchurn.update.sync import run_sync

BATCHES = 3


def _keyed(keys: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    """Batches of ``SPOOL_ROWS`` rows keyed by ``keys``, with no ``id`` column."""
    for b in range(BATCHES):
        n = pa.array(range(b * SPOOL_ROWS, (b + 1) * SPOOL_ROWS), pa.int64())
        names = pc.cast(n, pa.string())
        columns = {"cid": n} if keys == ("cid",) else {"region": pc.utf8_slice_codeunits(names, 0, 1), "cid": n}
        yield pa.RecordBatch.from_pydict({**columns, "name": names})


@pytest.mark.parametrize("keys", [("cid",), ("region", "cid")], ids=["one-key", "composite-key"])
def test_a_source_without_an_id_is_hashed_once_when_spooled(
    keys: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row hashed with two seeds once, as a source with an ``id`` is, not again when the target is written."""
    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    original = pl.DataFrame.hash_rows
    with mock.patch.object(pl.DataFrame, "hash_rows", autospec=True, side_effect=original) as spy:
        plan, _ = plan_streamed(_keyed(keys), store, options(initial_load="baseline", key_columns=keys), T0)
        hashed_in_all = sum(call.args[0].height for call in spy.call_args_list)
    assert isinstance(plan, StreamedPlan)
    assert plan.target_rows == BATCHES * SPOOL_ROWS
    written = store.read_snapshot(plan.target_version)
    assert_frame_equal(written.select(HASH_1, HASH_2), with_hashes(written.drop(HASH_1, HASH_2)).select(HASH_1, HASH_2))
    assert hashed_in_all == 2 * BATCHES * SPOOL_ROWS, "rows hashed again after they were spooled"


@dataclass
class NoIdSource(Source):
    """``Source``'s rows keyed by ``cid``: the same columns with ``id`` renamed (the id is derived from ``cid``)."""

    def batches(self) -> list[pa.RecordBatch]:
        return [b.rename_columns(["cid", *b.schema.names[1:]]) for b in super().batches()]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=sources(), policy=st.sampled_from(["fail", "update_all", "rebaseline"]))
def test_a_source_keyed_without_an_id_is_planned_the_same_on_both_paths(
    runs: list[Source],
    policy: str,
    stopchurn_sandbox_factory: Callable[..., SandboxServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Plans, targets, requests, errors and what StopChurn holds are the same on both paths, run after run."""
    keyed = [NoIdSource(r.rows, r.cuts, r.text_from) for r in runs]
    kw: dict[str, Any] = {"key_columns": ("cid",), "on_schema_change": policy, "max_delete_fraction": 1.0}
    _check_runs(list[Source](keyed), stopchurn_sandbox_factory, monkeypatch, "always", **kw)


def _spool_mappings(folder: Path) -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line.strip() for line in maps if str(folder) in line]


def _table(rows: int, value: pa.DataType) -> pa.Table:
    ids = pa.array(range(rows), pa.int64())
    return pa.table({"id": ids, "v": ids.cast(value), "name": pc.cast(ids, pa.string())})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_plan_the_whole_path_makes_from_the_spool_holds_no_spool_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopchurn_sandbox: SandboxServer
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    rows = SPOOL_ROWS * 2
    run_sync(lambda: _table(rows, pa.int64()), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    # ``v`` turns float: a schema change, planned by the whole path from the spool
    plan, _ = plan_streamed(_table(rows, pa.float64()), store, options(on_schema_change="update_all"), T0 + 1)
    assert not isinstance(plan, StreamedPlan)
    assert plan.target.height == rows
    assert not any(temporary.iterdir())
    assert _spool_mappings(temporary) == []
    assert plan.target.get_column("v").sum() == sum(range(rows))
