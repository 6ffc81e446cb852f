"""The bad input matrix: every refusal is clear, sends nothing it should not, and leaves the snapshot alone.

Each case starts from a committed snapshot (one clean run), then asserts the error type, that its text names
what is wrong (column, keys, numbers), that no update request reached the sandbox, and that no file under the
snapshot root changed (a digest of the whole tree before and after).
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from helpers_sync import (
    BRAND,
    T0,
    TABLE,
    FailAfter,
    assert_sandbox_matches,
    list_files,
    make_client,
    options,
    read_json,
    received_counts,
    sandbox_rows,
    tree_digest,
    update_requests,
)

from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import event_store
from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.exceptions import (
    SafeguardError,
    SourceDataError,
    StopChurnAuthError,
    StopChurnConfigError,
    StopChurnError,
    StopChurnRejectedError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.export.engine import run_export
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.source.sql import read_dbapi
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync
from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, WarehouseSource, run_warehouse_sync

N = 200


def base_frame(n: int = N) -> pd.DataFrame:
    ids = np.arange(1, n + 1)
    return pd.DataFrame(
        {
            "id": ids,
            "plan": np.where(ids % 3 == 0, "pro", "free").astype(object),
            "qty": (ids * 7) % 11,
            "score": np.where(ids % 5 == 0, np.nan, ids / 4),
        }
    )


@dataclass
class World:
    sb: SandboxServer
    store: SnapshotStore
    root: Path

    def client(self, **kwargs: Any) -> Any:
        return make_client(self.sb, **kwargs)

    def run(self, frame: pd.DataFrame, **opts: Any) -> Any:
        client_kwargs = opts.pop("client_kwargs", {})
        return run_sync(frame, self.store, self.client(**client_kwargs), options(**opts), run_ms=T0 + 1000)

    def current(self) -> dict[str, Any]:
        return read_json(self.root / str(BRAND) / TABLE / "CURRENT")


@pytest.fixture
def world(stopchurn_sandbox_factory: Any, tmp_path: Path) -> Iterator[World]:
    sb = stopchurn_sandbox_factory(record=True)
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, BRAND, TABLE)
    run_sync(base_frame(), store, make_client(sb), options(chunk_size=50), run_ms=T0)
    sb.reset()  # count only what the case under test sends
    yield World(sb, store, root)


def assert_short_first_line(text: str) -> None:
    """Airflow's log viewer cuts long lines: what happened fits the first line, details follow."""
    assert len(text.splitlines()[0]) <= 120, text


def refused(
    world: World, frame: pd.DataFrame | Callable[[], Any], error: type[Exception], words: list[str], **opts: Any
) -> StopChurnError:
    """Run and assert: ``error`` naming ``words``, no request, no file changed, the lock released."""
    digest = tree_digest(world.root, history=False)  # the failed run is recorded, nothing else is written
    with pytest.raises(error) as info:
        run_sync(frame, world.store, world.client(), options(**opts), run_ms=T0 + 1000)
    text = str(info.value)
    for word in words:
        assert word in text, (word, text)
    if error is SafeguardError:
        assert_short_first_line(text)
    assert update_requests(world.sb) == 0
    assert tree_digest(world.root, history=False) == digest
    assert world.store.read_history(1)[0]["error_type"] == error.__name__
    assert world.store.read_lock() is None
    assert isinstance(info.value, StopChurnError)
    return info.value


class Thing:
    """A value no JSON encoder knows."""


# --- source data -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("frame", "keys", "words"),
    [
        pytest.param(
            pd.DataFrame({"id": [1, 2, 2, 3, 3], "v": range(5)}),
            ("id",),
            ["Duplicate key", "'id'", "2, 3", "unique"],
            id="duplicate-keys",
        ),
        pytest.param(
            pd.DataFrame({"region": ["eu", "eu", "us"], "num": [1, 1, 1]}),
            ("region", "num"),
            ["Duplicate composite key", "'region', 'num'", "('eu', 1)"],
            id="duplicate-composite-keys",
        ),
        pytest.param(
            pd.DataFrame({"id": pd.array([1, None, 3], dtype="Int64"), "v": [1, 2, 3]}),
            ("id",),
            ["Key column 'id'", "1 missing value", "row(s) 1"],
            id="null-int-key",
        ),
        pytest.param(
            pd.DataFrame({"id": ["a", None, None], "v": [1, 2, 3]}),
            ("id",),
            ["Key column 'id'", "2 missing value", "1, 2"],
            id="null-string-key",
        ),
        pytest.param(
            pd.DataFrame({"id": [1, 2], "v": [1, 2]}),
            ("user_id",),
            ["'user_id' not found", "'id', 'v'"],
            id="missing-key-column",
        ),
        pytest.param(
            pd.DataFrame({"id": [1, 2], "avatar": [b"\x89PNG", b"GIF8"]}),
            ("id",),
            ["'avatar'", "bytes"],
            id="bytes-values",
        ),
        pytest.param(
            pd.DataFrame({"id": [1, 2], "owner": [Thing(), Thing()]}),
            ("id",),
            ["'owner'", "Thing"],
            id="object-values",
        ),
        pytest.param(
            pd.DataFrame({"id": [1.0, np.nan, 3.0], "v": [1, 2, 3]}),
            ("id",),
            ["Key column 'id'", "missing value", "NaN"],
            id="nan-key",
        ),
        pytest.param(
            pd.DataFrame({"id": [1.0, np.inf, -np.inf], "v": [1, 2, 3]}),
            ("id",),
            ["Key column 'id'", "infinite", "1, 2"],
            id="inf-key",
        ),
        pytest.param(
            pd.DataFrame({"id": [1, "2", 3], "v": [1, 2, 3]}),
            ("id",),
            ["Key column 'id'", "mixes value types"],
            id="mixed-key-types",
        ),
        pytest.param(
            pd.DataFrame({"id": [1.5, 2.0], "v": [1, 2]}),
            ("id",),
            ["Key column 'id'", "1.5", "whole numbers"],
            id="fractional-float-key",
        ),
    ],
)
def test_bad_source_is_refused_before_anything_is_sent(
    world: World, frame: pd.DataFrame, keys: tuple[str, ...], words: list[str]
) -> None:
    refused(world, frame, SourceDataError, words, key_columns=keys)


def test_source_that_is_not_a_dataframe(world: World) -> None:
    refused(world, lambda: [{"id": 1}], SourceDataError, ["pandas DataFrame", "list"])


def test_bad_timestamp_column(world: World) -> None:
    frame = base_frame().assign(created=["yesterday"] * N)
    refused(world, frame, SourceDataError, ["created_at column 'created'", "string"], created_at_column="created")
    refused(world, base_frame(), SourceDataError, ["'nope'", "not in the source"], updated_at_column="nope")


def test_row_over_max_chunk_bytes(world: World) -> None:
    frame = base_frame()
    frame.loc[frame.id == 5, "plan"] = "x" * 5000
    err = refused(world, frame, SourceDataError, ["max_chunk_bytes=2000", "bytes"], max_chunk_bytes=2000)
    assert "position" in str(err)


# --- safeguards ------------------------------------------------------------------------------------------------
def test_empty_source_over_a_non_empty_snapshot(world: World) -> None:
    empty = base_frame().iloc[0:0]
    refused(world, empty, SafeguardError, ["is empty", f"holds {N} rows", "allow_empty_source"])
    summary = world.run(empty, allow_empty_source=True)
    assert summary.deleted == N
    assert world.sb.rows(BRAND, TABLE) == [] and len(world.sb.received()) == N


def test_mass_delete_over_max_delete_fraction(world: World) -> None:
    kept = base_frame().iloc[:80]  # deletes 120 of 200 = 60%
    refused(world, kept, SafeguardError, ["deletes 120 of 200 rows", "60.0%", "max_delete_fraction=50%"])
    refused(
        world,
        base_frame().iloc[:150],
        SafeguardError,
        ["deletes 50 of 200", "max_delete_fraction=20%"],
        max_delete_fraction=0.2,
    )
    summary = world.run(kept, allow_large_changes=True)
    assert summary.deleted == 120
    counts = received_counts(world.sb.received())
    assert sum(counts.values()) == 120 and {k for k, _ in counts} == {"delete"}


def test_schema_drift_fail_lists_the_columns(world: World) -> None:
    drifted = base_frame().drop(columns=["score"]).assign(tier=1, qty=lambda f: f.qty.astype(str))
    err = refused(world, drifted, SafeguardError, ["added ['tier']", "removed ['score']", "qty (int -> string)"])
    assert "on_schema_change" in str(err)


def test_schema_drift_update_all_sends_every_row(world: World) -> None:
    drifted = base_frame().assign(tier="gold")
    drifted = drifted[drifted.id != 7]  # plus one delete and one insert
    drifted = pd.concat([drifted, base_frame(N + 1).tail(1).assign(tier="new")], ignore_index=True)
    summary = world.run(drifted, on_schema_change="update_all")
    assert summary.schema_change is not None and summary.schema_change["added"] == ["tier"]
    assert (summary.updated, summary.inserted, summary.deleted) == (N - 1, 1, 1)
    counts = received_counts(world.sb.received())
    assert sum(1 for kind, _ in counts if kind == "update") == N - 1
    assert sum(1 for kind, _ in counts if kind == "insert") == 1
    assert ("delete", 7) in counts
    assert_sandbox_matches(world.sb, drifted)
    # the new schema is the snapshot now: the same source again sends nothing
    again = world.run(drifted)
    assert again.requests == 0 and again.schema_change is None


def test_schema_drift_rebaseline_records_without_sending(world: World) -> None:
    before = world.current()
    drifted = base_frame().assign(tier="gold")
    summary = world.run(drifted, on_schema_change="rebaseline")
    assert summary.baseline and summary.requests == 0
    assert summary.schema_change == {"policy": "rebaseline", "added": ["tier"]}
    assert update_requests(world.sb) == 0
    after = world.current()
    assert after["version"] != before["version"] and "tier" in after["kinds"]
    again = world.run(drifted)
    assert again.requests == 0 and again.unchanged == N


# --- delivery refused by StopChurn -----------------------------------------------------------------------------
def test_wrong_api_key_fails_once_without_retry(world: World) -> None:
    before = world.current()
    with pytest.raises(StopChurnAuthError) as info:
        world.run(base_frame().assign(qty=0), client_kwargs={"api_key": "not-the-key", "max_retries": 5})
    assert "401" in str(info.value) and "Invalid client api token" in str(info.value)
    assert info.value.permanent
    stats = world.sb.stats()
    assert stats["requests"] == 1 and stats["unauthorized"] == 1
    assert world.current() == before
    assert world.sb.rows(BRAND, TABLE) == []
    # nothing was acknowledged, so nothing was committed; with the right key the next run plans again
    assert world.store.pending_plan() is None
    summary = world.run(base_frame().assign(qty=0))
    assert summary.settled_chunks == 0 and summary.updated > 0
    assert all(r["qty"] == 0 for r in world.sb.rows(BRAND, TABLE))


def test_400_with_json_body_keeps_acknowledged_chunks(world: World) -> None:
    changed = base_frame().assign(qty=-1)  # 200 updates in 4 chunks of 50
    world.sb.reject_ids({120})  # in the third chunk
    before = world.current()
    with pytest.raises(StopChurnRejectedError) as info:
        world.run(changed, chunk_size=50, max_concurrent_requests=1)
    text = str(info.value)
    assert text.splitlines()[0] == f"StopChurn rejected chunk 3 of 4 of {TABLE!r} (400)."
    assert "chunk 3 of 4" in text and "updates 101-150" in text
    assert "Update reception failed: row 120 rejected by sandbox rule" in text
    assert info.value.reason == "Update reception failed: row 120 rejected by sandbox rule"
    assert info.value.permanent and info.value.attempts == 1
    # the two acknowledged chunks were settled: nothing is pending, nothing needs a hand edit
    assert world.current()["version"] != before["version"] and world.current()["rows"] == N
    assert world.store.pending_plan() is None
    assert update_requests(world.sb) == 3
    assert sum(received_counts(world.sb.received()).values()) == 100

    world.sb.reject_ids(set())
    summary = world.run(changed, chunk_size=50, max_concurrent_requests=1)
    assert summary.updated == 100 and summary.settled_chunks == 0
    counts = received_counts(world.sb.received())
    assert len(counts) == N and set(counts.values()) == {1}
    assert all(r["qty"] == -1 for r in world.sb.rows(BRAND, TABLE))


def test_400_without_json_body(world: World) -> None:
    world.sb.queue_response(400, "<html><body><h1>Bad Request</h1> <b>payload</b> refused</body></html>")
    before = world.current()
    with pytest.raises(StopChurnRejectedError) as info:
        world.run(base_frame().assign(qty=5), chunk_size=100, max_concurrent_requests=1)
    text = str(info.value)
    assert "chunk 1 of 2" in text and "Bad Request payload refused" in text and "<h1>" not in text
    assert update_requests(world.sb) == 1
    # StopChurn does not say whether a refused request was applied in part: its rows are recorded as unsure
    # (resent next run); the chunk never sent is not; nothing is pending
    assert world.current()["rows"] == before["rows"] and world.store.pending_plan() is None
    summary = world.run(base_frame().assign(qty=5), chunk_size=100, max_concurrent_requests=1)
    assert summary.updated == sum(base_frame().qty != 5)
    assert all(r["qty"] == 5 for r in world.sb.rows(BRAND, TABLE))


@pytest.mark.parametrize("html", [False, True])
def test_5xx_forever(world: World, html: bool) -> None:
    world.sb.set_faults(FaultConfig(error_rate=1.0, html_errors=html))
    before = world.current()
    with pytest.raises(TransientDeliveryError) as info:
        world.run(base_frame().assign(qty=5), client_kwargs={"max_retries": 2}, max_concurrent_requests=1)
    text = str(info.value)
    assert "3 attempts" in text and "HTTP 500" in text
    if html:
        assert "500 Internal Server Error" in text and "<h1>" not in text and "<html>" not in text
    else:
        assert "Internal server error" in text
    assert not info.value.permanent and info.value.status == 500
    assert update_requests(world.sb) == 3
    assert world.current()["rows"] == before["rows"] and world.store.pending_plan() is None
    assert world.sb.rows(BRAND, TABLE) == []
    world.sb.set_faults(FaultConfig())
    summary = world.run(base_frame().assign(qty=5), max_concurrent_requests=1)
    assert summary.updated == sum(base_frame().qty != 5)
    assert all(r["qty"] == 5 for r in world.sb.rows(BRAND, TABLE))


# --- options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"brand_id": None, "table_name": TABLE}, ["brand_id must be an integer", "None"]),
        ({"brand_id": "7", "table_name": TABLE}, ["brand_id must be an integer", "'7'"]),
        ({"brand_id": True, "table_name": TABLE}, ["brand_id must be an integer"]),
        ({"brand_id": 7, "table_name": " "}, ["table_name must be a non-empty string"]),
        ({"brand_id": 7, "table_name": TABLE, "key_columns": ()}, ["primary_key"]),
        ({"brand_id": 7, "table_name": TABLE, "chunk_size": 0}, ["chunk_size", "0"]),
        ({"brand_id": 7, "table_name": TABLE, "max_delete_fraction": 1.5}, ["max_delete_fraction", "1.5"]),
        ({"brand_id": 7, "table_name": TABLE, "on_schema_change": "ignore"}, ["on_schema_change", "'ignore'"]),
        ({"brand_id": 7, "table_name": TABLE, "max_concurrent_requests": 0}, ["max_concurrent_requests"]),
    ],
)
def test_invalid_options(kwargs: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(StopChurnConfigError) as info:
        SyncOptions(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_sender_required_unless_dry_run(world: World) -> None:
    with pytest.raises(StopChurnConfigError, match="sender"):
        run_sync(base_frame(), world.store, None, options(), run_ms=T0)


# --- quarantine ------------------------------------------------------------------------------------------------
def _quarantine_records(world: World) -> list[dict[str, Any]]:
    files = [p for p in list_files(world.root) if "quarantine" in p.parts]
    return [json.loads(line) for p in files for line in p.read_text().splitlines()]


def test_quarantine_delivers_the_rest_and_retries_rejected_rows(world: World) -> None:
    frame = base_frame().assign(qty=lambda f: f.qty + 100)  # 200 updates
    frame = frame[frame.id != 50]  # 1 delete
    frame = pd.concat([frame, pd.DataFrame({"id": [500, 501], "plan": ["new", "new"], "qty": [1, 2]})])
    world.sb.reject_ids({17, 50, 501, 160})
    summary = world.run(frame, chunk_size=40, on_rejected_rows="quarantine")
    assert summary.quarantined == 4 and summary.quarantine_uri is not None
    records = _quarantine_records(world)
    assert sorted(r["update"]["data"]["data"]["id"] for r in records) == [17, 50, 160, 501]
    for record in records:
        row_id = record["update"]["data"]["data"]["id"]
        assert record["reason"] == f"Update reception failed: row {row_id} rejected by sandbox rule"
    assert {r["update"]["type"] for r in records} == {"update", "delete", "insert"}
    # everything else arrived; the rejected rows did not
    got = sandbox_rows(world.sb)
    assert ("int", 17) not in got and ("int", 501) not in got and ("int", 500) in got
    assert len(got) == (N - 1 - 2) + 1  # 199 updates but 17 and 160, plus insert 500 (the sandbox was reset)
    # the snapshot was committed without the rejected changes: the next run sends exactly those
    assert world.store.pending_plan() is None
    world.sb.reject_ids(set())
    mark = len(world.sb.received())
    again = world.run(frame, chunk_size=40, on_rejected_rows="quarantine")
    assert (again.inserted, again.updated, again.deleted, again.quarantined) == (1, 2, 1, 0)
    assert sorted(row_id for _, _, _, row_id in world.sb.received()[mark:]) == [17, 50, 160, 501]
    got = sandbox_rows(world.sb)
    assert got[("int", 17)]["qty"] == int(frame[frame.id == 17].qty.iloc[0]) and ("int", 501) in got


def test_max_rejected_rows_exceeded_commits_the_rest(world: World) -> None:
    frame = base_frame().assign(qty=lambda f: f.qty + 1)
    bad = {3, 33, 63, 93, 123}
    world.sb.reject_ids(bad)
    before = world.current()
    with pytest.raises(SafeguardError) as info:
        world.run(frame, chunk_size=50, on_rejected_rows="quarantine", max_rejected_rows=2)
    text = str(info.value)
    assert "rejected 5 rows" in text and "max_rejected_rows=2" in text and "quarantine" in text
    assert_short_first_line(text)
    assert world.current()["version"] != before["version"]  # the rest was committed
    assert world.store.pending_plan() is None
    assert len(world.sb.rows(BRAND, TABLE)) == N - len(bad)
    assert sorted(r["update"]["data"]["data"]["id"] for r in _quarantine_records(world)) == sorted(bad)
    world.sb.reject_ids(set())
    again = world.run(frame, on_rejected_rows="quarantine", max_rejected_rows=2)
    assert again.updated == len(bad)
    assert all(r["qty"] == int(frame[frame.id == r["id"]].qty.iloc[0]) for r in world.sb.rows(BRAND, TABLE))


def test_quarantine_after_a_failed_try_sends_the_current_source(world: World) -> None:
    client = world.client()
    first = base_frame().assign(qty=lambda f: f.qty + 1)  # 200 updates, 10 chunks of 20
    with pytest.raises(TransientDeliveryError):
        run_sync(first, world.store, FailAfter(client, world.sb, 2), options(chunk_size=20, max_concurrent_requests=1))
    world.sb.set_faults(FaultConfig())
    # the source moved on: row 7 (delivered already) changes again, row 150 (not delivered) is back to what
    # StopChurn holds, so it is not sent at all
    second = first.assign(qty=lambda f: np.where(f.id == 7, 999, np.where(f.id == 150, (150 * 7) % 11, f.qty)))
    world.sb.reject_ids({150, 7})
    mark = len(world.sb.received())
    summary = run_sync(second, world.store, client, options(chunk_size=20, on_rejected_rows="quarantine"))
    assert summary.quarantined == 1 and summary.rejected[0]["id"] == 7
    assert sorted(r["update"]["data"]["data"]["id"] for r in _quarantine_records(world)) == [7]
    assert 150 not in {row_id for _, _, _, row_id in world.sb.received()[mark:]}
    assert summary.updated == 200 - 40 - 1  # the 160 not yet delivered but 150; the rejected 7 is not counted


# --- column names the engines cannot carry (every source kind, every path) ---------------------------------------
class SqliteHook:
    """A DB-API hook of a real SQLite file (what ``read_dbapi`` needs of common-sql's ``DbApiHook``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get_conn(self) -> Any:
        return sqlite3.connect(self.path)


def named_source(kind: str, name: str, tmp_path: Path, *, value: str = "plan") -> Callable[[], Any]:
    """A source whose column ``value`` (of base_frame) is called ``name``, as each kind of source delivers it."""
    frame = base_frame().rename(columns={value: name})
    if kind == "pandas":
        return lambda: frame
    if kind == "polars":  # renamed in polars: pl.from_pandas itself names an empty column "column_1"
        return lambda: pl.from_pandas(base_frame()).rename({value: name})
    if kind == "arrow":
        return lambda: pa.Table.from_pandas(frame, preserve_index=False)
    path = tmp_path / "source.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP TABLE IF EXISTS src")
        conn.execute("CREATE TABLE src (id INTEGER, plan TEXT, qty INTEGER, score REAL)")
        conn.executemany("INSERT INTO src VALUES (?, ?, ?, ?)", base_frame().itertuples(index=False))
        conn.commit()
    columns = ", ".join(f'{c} AS "{name}"' if c == value else c for c in base_frame().columns)
    return lambda: read_dbapi(SqliteHook(path), f"SELECT {columns} FROM src")


BAD_NAMES = [
    pytest.param("__sc_created_at", "'__sc_created_at'", id="snapshot-meta-column"),
    pytest.param("__sc_hash_1", "'__sc_hash_1'", id="row-hash-column"),
    pytest.param("__sc_op", "'__sc_op'", id="plan-column"),
    pytest.param("", "column number 2", id="empty-name"),
]
SOURCE_KINDS = ["pandas", "polars", "arrow", "sql"]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize(("name", "named"), BAD_NAMES)
def test_a_reserved_or_empty_column_name_is_refused_on_the_update_path(
    world: World, tmp_path: Path, kind: str, name: str, named: str
) -> None:
    err = refused(world, named_source(kind, name, tmp_path), SourceDataError, [named, "Nothing was sent"])
    assert_short_first_line(str(err))
    assert err.permanent
    # the source fixed (the column renamed back): the next run works and sends only what changed
    fixed = base_frame().assign(plan="changed")
    summary = world.run(fixed)
    assert summary.updated == N and update_requests(world.sb) > 0
    assert_sandbox_matches(world.sb, fixed)


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize(("name", "named"), BAD_NAMES)
def test_a_reserved_or_empty_column_name_is_refused_by_the_export(
    tmp_path: Path, kind: str, name: str, named: str
) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    options_ = ExportOptions(brand_id=BRAND, table_name=TABLE, run_id="r1")
    with pytest.raises(SourceDataError, match=re.escape(named)):
        run_export(named_source(kind, name, tmp_path), store, tmp_path / "export", options_, run_ms=T0)
    assert store.read_committed() is None and not list(tmp_path.glob("export/**/*.json"))
    summary = run_export(base_frame(), store, tmp_path / "export", options_, run_ms=T0)
    assert summary.rows == N and store.read_committed() is not None


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize(("name", "named"), BAD_NAMES)
def test_a_reserved_or_empty_column_name_is_refused_by_the_events(
    stopchurn_sandbox_factory: Any, tmp_path: Path, kind: str, name: str, named: str
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    store = event_store(tmp_path / "events", BRAND, "plans")
    opts = EventOptions(brand_id=BRAND, user_id_column="id", name="PLAN")  # every column is the event's key
    read = named_source(kind, name, tmp_path)
    with pytest.raises(SourceDataError, match=re.escape(named)):
        run_events(lambda _window: read(), store, make_client(sb), opts)
    assert sb.stats()["requests"] == 0
    summary = run_events(base_frame(), store, make_client(sb), opts)
    assert summary.sent == N and len(sb.events(BRAND)) == N


@pytest.mark.parametrize("name", ["__sc_created_at", "__sc_row"])
def test_a_reserved_column_name_is_refused_by_the_warehouse_diff(
    stopchurn_sandbox_factory: Any, tmp_path: Path, name: str
) -> None:
    duckdb = pytest.importorskip("duckdb")
    sb = stopchurn_sandbox_factory(record=True)
    database = str(tmp_path / "warehouse.duckdb")
    with duckdb.connect(database) as conn:
        conn.execute(f'CREATE TABLE src AS SELECT 1 AS id, 2 AS "{name}"')
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)

    def run(sql: str) -> Any:
        source = WarehouseSource(sql, DuckDBWarehouse(database), state_schema="stopchurn_state")
        return run_warehouse_sync(source, store, make_client(sb), options(), run_ms=T0)

    with pytest.raises(SourceDataError, match=re.escape(repr(name))):
        run("SELECT * FROM src")
    assert update_requests(sb) == 0 and store.read_current() is None
    summary = run(f'SELECT id, "{name}" AS renamed FROM src')
    assert summary.inserted == 1 and sb.rows(BRAND, TABLE) == [{"id": 1, "renamed": 2}]
