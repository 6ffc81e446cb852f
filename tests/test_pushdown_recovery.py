"""Failure paths of the warehouse diff: StopChurn failing, rejecting, losing an acknowledgement, answering a 200
that is not its acknowledgement, and the worker dying at every write of the store or the warehouse. After each,
once the cause is gone, one more run must make StopChurn equal to the source without anyone editing the state
table or the store, and the run after that must send nothing.
"""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from helpers_sync import BRAND, T0, TABLE, FailAfter, assert_sandbox_matches, make_client, options, sandbox_rows
from pushdown_engines import Engine, engine_fixture
from test_crash_matrix_object_store import KillableMemoryFileSystem, Killed
from test_pushdown import QUERY, churn, table
from upath import UPath

from airflow_provider_stopchurn.exceptions import DeliveryError, StopChurnRejectedError
from airflow_provider_stopchurn.pushdown import DuckDBWarehouse, WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.sandbox import FaultConfig
from airflow_provider_stopchurn.snapshot import SnapshotStore

ENGINES = ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    yield from engine_fixture(request.param, request, tmp_path)


def _run(engine: Engine, store: SnapshotStore, sender: Any, tick: int, **opts: Any) -> Any:
    opts.setdefault("chunk_size", 4)
    opts.setdefault("max_concurrent_requests", 1)
    return run_warehouse_sync(
        WarehouseSource(QUERY, engine.warehouse()), store, sender, options(**opts), run_ms=T0 + tick
    )


def _converges(engine: Engine, store: SnapshotStore, sb: Any, frame: Any, tick: int) -> None:
    _run(engine, store, make_client(sb), tick)
    assert_sandbox_matches(sb, frame)
    assert store.pending_plan() is None
    again = _run(engine, store, make_client(sb), tick + 1)
    assert (again.inserted, again.updated, again.deleted, again.chunks) == (0, 0, 0, 0)


def test_a_failure_mid_delivery_settles_what_was_acknowledged(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(40)
    engine.load(frame)
    _run(engine, store, make_client(sb), 1)
    frame = churn(frame, 1)
    engine.load(frame)
    with pytest.raises(DeliveryError):
        _run(engine, store, FailAfter(make_client(sb), sb, 2), 2)
    assert store.pending_plan() is None  # settled at once, not left for a hand edit
    sb.set_faults(FaultConfig())
    frame = churn(frame, 2)  # the source moved on meanwhile
    engine.load(frame)
    _converges(engine, store, sb, frame, 3)


def test_a_lost_acknowledgement_leaves_no_phantom_rows(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Applied but unacknowledged inserts are dirty: when the source then drops them, they are deleted."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(20)
    engine.load(frame)
    _run(engine, store, make_client(sb), 1)
    grown = churn(frame, 4)
    engine.load(grown)
    sb.set_faults(FaultConfig(drop_after_apply_rate=1.0))
    with pytest.raises(DeliveryError):
        _run(engine, store, make_client(sb), 2)
    sb.set_faults(FaultConfig())
    engine.load(frame)  # the new rows are gone again from the source
    _converges(engine, store, sb, frame, 3)


def test_a_200_that_is_not_an_acknowledgement_is_not_trusted(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(20)
    engine.load(frame)
    sb.set_faults(FaultConfig(html_ok_rate=1.0))
    with pytest.raises(DeliveryError):
        _run(engine, store, make_client(sb), 1)
    assert sandbox_rows(sb) == {}
    sb.set_faults(FaultConfig())
    _converges(engine, store, sb, frame, 2)


def test_rejected_rows_are_quarantined_and_sent_again(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(30)
    engine.load(frame)
    sb.reject_ids(["7", "21"])
    summary = _run(engine, store, make_client(sb), 1, on_rejected_rows="quarantine")
    assert summary.quarantined == 2
    assert {r["id"] for r in summary.rejected} == {7, 21}
    assert store.read_quarantine()
    assert ("int", 7) not in sandbox_rows(sb)
    sb.reject_ids(())
    again = _run(engine, store, make_client(sb), 2)
    assert again.inserted == 2  # only the two rejected rows go again
    assert_sandbox_matches(sb, frame)


def test_a_rejection_under_fail_then_a_fixed_source_goes_through(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(30)
    engine.load(frame)
    sb.reject_ids(["12"])
    with pytest.raises(StopChurnRejectedError):
        _run(engine, store, make_client(sb), 1)
    sb.reject_ids(())
    engine.load(frame.drop(index=11).reset_index(drop=True))  # the user fixed the source: row 12 removed
    _converges(engine, store, sb, frame.drop(index=11).reset_index(drop=True), 2)


# --------------------------------------------------------------------------------------------------------------
# the crash matrix: a worker dying at every write (store files and warehouse statements)
# --------------------------------------------------------------------------------------------------------------
class KillableDuckDB(DuckDBWarehouse):
    """A DuckDB warehouse whose writes count with the store's (one sequence of durable writes) and die with it."""

    def _step(self, run: Any) -> None:
        fs = KillableMemoryFileSystem
        if fs.dead:
            raise Killed
        fs.writes += 1
        if fs.writes == fs.crash_at and fs.when == "before":
            fs.dead = True
            raise Killed
        run()
        if fs.writes == fs.crash_at and fs.when == "after":
            fs.dead = True
            raise Killed

    def execute(self, statements: Any) -> None:
        self._step(lambda: super(KillableDuckDB, self).execute(statements))

    def load(self, table: str, data: pa.Table) -> None:
        self._step(lambda: super(KillableDuckDB, self).load(table, data))


def _store() -> SnapshotStore:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        root = UPath(f"killmem://stopchurn/{uuid.uuid4().hex}")
    return SnapshotStore(root, BRAND, TABLE)


def test_killed_at_every_write_then_a_clean_run_converges(stopchurn_sandbox_factory: Any, tmp_path: Path) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    engine = Engine("duckdb", tmp_path / "w.duckdb")
    base, second, moved = table(24), churn(table(24), 1), churn(churn(table(24), 1), 2)

    def fresh() -> SnapshotStore:
        KillableMemoryFileSystem.arm(0, "never")
        sb.reset()
        engine.execute("DROP SCHEMA IF EXISTS stopchurn_state CASCADE")
        engine.load(base)
        store = _store()
        run_warehouse_sync(source(), store, make_client(sb), options(chunk_size=5), run_ms=T0)
        engine.load(second)
        return store

    def source() -> WarehouseSource:
        return WarehouseSource(QUERY, KillableDuckDB(str(engine.handle)))

    store = fresh()
    KillableMemoryFileSystem.arm(0, "never")
    run_warehouse_sync(source(), store, make_client(sb), options(chunk_size=5), run_ms=T0 + 1)
    writes = KillableMemoryFileSystem.writes
    assert writes >= 5
    for n in range(1, writes + 1):
        for when in ("before", "after"):
            store = fresh()
            KillableMemoryFileSystem.arm(n, when)
            with pytest.raises(Killed):
                run_warehouse_sync(source(), store, make_client(sb), options(chunk_size=5), run_ms=T0 + 1)
            KillableMemoryFileSystem.arm(0, "never")
            store.break_lock()
            engine.load(moved)
            run_warehouse_sync(source(), store, make_client(sb), options(chunk_size=5), run_ms=T0 + 2)
            assert_sandbox_matches(sb, moved)
            assert store.pending_plan() is None, (n, when)
            again = run_warehouse_sync(source(), store, make_client(sb), options(chunk_size=5), run_ms=T0 + 3)
            assert again.inserted + again.updated + again.deleted == 0, (n, when)
