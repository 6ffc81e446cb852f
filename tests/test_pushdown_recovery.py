"""Failure paths of the warehouse diff: StopChurn failing, rejecting, losing an acknowledgement, answering a 200
that is not its acknowledgement, and the worker dying at every write of the store or the warehouse. After each,
once the cause is gone, one more run must make StopChurn equal to the source without anyone editing the state
table or the store, and the run after that must send nothing.
"""

from __future__ import annotations

import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from helpers_sync import (
    BRAND,
    T0,
    TABLE,
    FailAfter,
    assert_sandbox_matches,
    make_client,
    options,
    sandbox_rows,
    update_requests,
)
from killswitch_fs import KillSwitchFileSystem, fresh_root
from pushdown_engines import Engine, engine_fixture, local_engine  # noqa: F401 - local_engine: the engine fixture
from test_crash_matrix_object_store import KillableMemoryFileSystem, Killed
from test_pushdown import QUERY, churn, table
from upath import UPath

from airflow_provider_stopchurn.exceptions import DeliveryError, StopChurnRejectedError
from airflow_provider_stopchurn.sandbox import FaultConfig
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, WarehouseSource, reconcile, run_warehouse_sync


def run_on(engine: Engine, store: SnapshotStore, sender: Any, tick: int, **opts: Any) -> Any:
    """One warehouse run on ``engine``'s source at ``T0 + tick``, in chunks of 4 sent one at a time by default."""
    opts.setdefault("chunk_size", 4)
    opts.setdefault("max_concurrent_requests", 1)
    return run_warehouse_sync(
        WarehouseSource(QUERY, engine.warehouse()), store, sender, options(**opts), run_ms=T0 + tick
    )


def _converges(engine: Engine, store: SnapshotStore, sb: Any, frame: Any, tick: int) -> None:
    run_on(engine, store, make_client(sb), tick)
    assert_sandbox_matches(sb, frame)
    assert store.pending_plan() is None
    again = run_on(engine, store, make_client(sb), tick + 1)
    assert (again.inserted, again.updated, again.deleted, again.chunks) == (0, 0, 0, 0)


def test_a_failure_mid_delivery_settles_what_was_acknowledged(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(40)
    engine.load(frame)
    run_on(engine, store, make_client(sb), 1)
    frame = churn(frame, 1)
    engine.load(frame)
    with pytest.raises(DeliveryError):
        run_on(engine, store, FailAfter(make_client(sb), sb, 2), 2)
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
    run_on(engine, store, make_client(sb), 1)
    grown = churn(frame, 4)
    engine.load(grown)
    sb.set_faults(FaultConfig(drop_after_apply_rate=1.0))
    with pytest.raises(DeliveryError):
        run_on(engine, store, make_client(sb), 2)
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
        run_on(engine, store, make_client(sb), 1)
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
    summary = run_on(engine, store, make_client(sb), 1, on_rejected_rows="quarantine")
    assert summary.quarantined == 2
    assert {r["id"] for r in summary.rejected} == {7, 21}
    assert store.read_quarantine()
    assert ("int", 7) not in sandbox_rows(sb)
    sb.reject_ids(())
    again = run_on(engine, store, make_client(sb), 2)
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
        run_on(engine, store, make_client(sb), 1)
    sb.reject_ids(())
    engine.load(frame.drop(index=11).reset_index(drop=True))  # the user fixed the source: row 12 removed
    _converges(engine, store, sb, frame.drop(index=11).reset_index(drop=True), 2)


def test_a_killed_runs_rejection_that_is_accepted_now_is_not_reported(
    engine: Engine, stopchurn_sandbox_factory: Any
) -> None:
    """A run killed before it settled leaves a plan with a row StopChurn rejected. Once StopChurn accepts it, the
    next run settles that plan (another run's: counted apart, as the worker path does), sends the row again and
    reports no rejection: its ``rejected`` are the rows it leaves rejected."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(fresh_root(), BRAND, TABLE)
    frame = table(12)
    engine.load(frame)
    sb.reject_ids(["5"])
    # die before the settle records the rows still rejected: the acknowledgements are kept, the plan is pending
    KillSwitchFileSystem.arm(lambda path, _count: "/quarantine/" in path and path.endswith(".jsonl"))
    try:
        with pytest.raises(Killed):
            run_on(engine, store, make_client(sb), 1, on_rejected_rows="quarantine")
    finally:
        KillSwitchFileSystem.arm(None)
    store.break_lock()
    assert store.pending_plan() is not None
    sb.reject_ids(())
    summary = run_on(engine, store, make_client(sb), 2, on_rejected_rows="quarantine")
    assert (summary.rejected, summary.quarantined) == ([], 0)
    assert summary.settled_from_other_runs["rejected"] == 1
    assert_sandbox_matches(sb, frame)
    assert store.read_quarantine() == []
    again = run_on(engine, store, make_client(sb), 3)
    assert (again.inserted, again.updated, again.deleted, again.chunks) == (0, 0, 0, 0)


# --------------------------------------------------------------------------------------------------------------
# the crash matrix: a worker dying at every write (store files and warehouse statements)
# --------------------------------------------------------------------------------------------------------------
def _step(run: Any) -> None:
    """One durable write of the warehouse, counted with the store's (one sequence of writes) and dying with it."""
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


class KillableDuckDB(DuckDBWarehouse):
    """A DuckDB warehouse whose writes (a transaction each) count with the store's and die with it."""

    def execute(self, statements: Any) -> None:
        _step(lambda: DuckDBWarehouse.execute(self, statements))

    def load(self, table: str, data: pa.Table) -> None:
        _step(lambda: DuckDBWarehouse.load(self, table, data))


def _killable_spark() -> type:
    from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse

    class KillableSpark(SparkWarehouse):
        """Spark runs each statement on its own (no transactions): the worker may die between any two of them.
        ``kill_after`` (a regular expression) kills the worker right after the first statement it matches; the
        store's writes die with it."""

        kill_after: re.Pattern[str] | None = None

        def execute(self, statements: Any) -> None:
            for statement in statements:
                if KillableMemoryFileSystem.dead:
                    raise Killed
                SparkWarehouse.execute(self, [statement])
                if self.kill_after is not None and self.kill_after.search(statement):
                    type(self).kill_after = None
                    KillableMemoryFileSystem.dead = True
                    raise Killed

    return KillableSpark


def _store() -> SnapshotStore:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        root = UPath(f"killmem://stopchurn/{uuid.uuid4().hex}")
    return SnapshotStore(root, BRAND, TABLE)


@dataclass
class Matrix:
    """One engine's crash matrix: ``killable()`` is a warehouse whose writes die with the store's."""

    engine: Engine
    sb: Any
    killable: Any
    state_schema: str = "stopchurn_state"

    def source(self) -> WarehouseSource:
        handle = str(self.engine.handle) if self.engine.name == "duckdb" else self.engine.handle
        return WarehouseSource(QUERY, self.killable(handle), state_schema=self.state_schema)

    def run(self, store: SnapshotStore, tick: int, **opts: Any) -> Any:
        opts.setdefault("chunk_size", 5)
        return run_warehouse_sync(self.source(), store, make_client(self.sb), options(**opts), run_ms=T0 + tick)

    def drop_state(self) -> None:
        if self.engine.name == "spark":
            self.engine.execute(f"DROP DATABASE IF EXISTS {self.state_schema} CASCADE")
        else:
            self.engine.execute(f"DROP SCHEMA IF EXISTS {self.state_schema} CASCADE")

    def points(self, writes: int, whens: tuple[str, ...]) -> list[tuple[int, str]]:
        if whens == ("after",):  # dying before write n leaves what dying after write n-1 leaves
            return [(1, "before")] + [(n, "after") for n in range(1, writes + 1)]
        return [(n, when) for n in range(1, writes + 1) for when in whens]

    def churn_run(self, whens: tuple[str, ...]) -> None:
        """A first load, then a run with deletes, updates and inserts that is killed at each write."""
        base, second, moved = table(24), churn(table(24), 1), churn(churn(table(24), 1), 2)

        def fresh() -> SnapshotStore:
            KillableMemoryFileSystem.arm(0, "never")
            self.sb.reset()
            self.drop_state()
            self.engine.load(base)
            store = _store()
            self.run(store, 0)
            self.engine.load(second)
            return store

        store = fresh()
        KillableMemoryFileSystem.arm(0, "never")
        self.run(store, 1)
        writes = KillableMemoryFileSystem.writes
        assert writes >= 5
        for n, when in self.points(writes, whens):
            store = fresh()
            KillableMemoryFileSystem.arm(n, when)
            with pytest.raises(Killed):
                self.run(store, 1)
            KillableMemoryFileSystem.arm(0, "never")
            store.break_lock()
            self.engine.load(moved)
            self.run(store, 2)
            assert_sandbox_matches(self.sb, moved)
            assert store.pending_plan() is None, (n, when)
            again = self.run(store, 3)
            assert again.inserted + again.updated + again.deleted == 0, (n, when)

    def baseline_run(self, whens: tuple[str, ...]) -> None:
        """StopChurn holds the table; its state was reset; the run recording it without sending is killed at each
        write. A retry of that run, then a run on a moved source, make StopChurn equal to the source."""
        second, moved = churn(table(24), 1), churn(churn(table(24), 1), 2)

        def fresh() -> SnapshotStore:
            KillableMemoryFileSystem.arm(0, "never")
            self.sb.reset()
            self.drop_state()
            self.engine.load(table(24))
            store = _store()
            self.run(store, 0)
            self.engine.load(second)
            self.run(store, 1)  # StopChurn holds `second`
            reconcile(self.source(), store, options(), action="reset")  # the state is lost: record it again
            return store

        store = fresh()
        KillableMemoryFileSystem.arm(0, "never")
        assert self.run(store, 2, initial_load="baseline").baseline
        writes = KillableMemoryFileSystem.writes
        assert writes >= 4
        for n, when in self.points(writes, whens):
            store = fresh()
            requests = update_requests(self.sb)
            KillableMemoryFileSystem.arm(n, when)
            with pytest.raises(Killed):
                self.run(store, 2, initial_load="baseline")
            KillableMemoryFileSystem.arm(0, "never")
            store.break_lock()
            self.run(store, 3, initial_load="baseline")  # the task's retry
            assert update_requests(self.sb) == requests, (n, when)  # a baseline sends nothing
            self.engine.load(moved)
            self.run(store, 4, initial_load="baseline")
            assert_sandbox_matches(self.sb, moved)
            assert store.pending_plan() is None, (n, when)
            again = self.run(store, 5)
            assert again.inserted + again.updated + again.deleted == 0, (n, when)


def test_killed_at_every_write_then_a_clean_run_converges(stopchurn_sandbox_factory: Any, tmp_path: Path) -> None:
    matrix = Matrix(Engine("duckdb", tmp_path / "w.duckdb"), stopchurn_sandbox_factory(record=True), KillableDuckDB)
    matrix.churn_run(("before", "after"))


def test_a_baseline_killed_at_every_write_then_converges(stopchurn_sandbox_factory: Any, tmp_path: Path) -> None:
    matrix = Matrix(Engine("duckdb", tmp_path / "w.duckdb"), stopchurn_sandbox_factory(record=True), KillableDuckDB)
    matrix.baseline_run(("before", "after"))


@pytest.fixture
def spark_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    yield from engine_fixture("spark", request, tmp_path)


_STATE = r"`stopchurn_state`\.`b7_subscription`"
_NEXT = r"`stopchurn_state`\.`b7_subscription__next`"
_META_NEXT = r"`stopchurn_state`\.`b7_subscription__meta_next`"
#: the bookkeeping table's rewrite and swap (the new token), in order
_TOKEN_STEPS = {
    "drop the old rewrite": rf"^DROP TABLE IF EXISTS {_META_NEXT}$",
    "write ..__meta_next": rf"^CREATE TABLE {_META_NEXT} AS ",
    "drop the bookkeeping table": r"^DROP TABLE IF EXISTS `stopchurn_state`\.`b7_subscription__meta`$",
    "rename ..__meta_next into place": rf"^ALTER TABLE {_META_NEXT} RENAME TO ",
}
#: every statement of the settle's rewrite and swap, in order
SETTLE_STEPS = {
    "drop the old rewrite": rf"^DROP TABLE IF EXISTS {_NEXT}$",
    "rewrite into ..__next": rf"^CREATE TABLE {_NEXT} AS ",
    "drop the state table": rf"^DROP TABLE IF EXISTS {_STATE}$",
    "rename ..__next into place": rf"^ALTER TABLE {_NEXT} RENAME TO ",
    **{f"token: {step}": pattern for step, pattern in _TOKEN_STEPS.items()},
}
#: every statement of the baseline's rebuild and swap, in order
BASELINE_STEPS = {
    "create ..__next": rf"^CREATE TABLE {_NEXT} \(",
    "fill ..__next": rf"^INSERT INTO {_NEXT} ",
    "drop the state table": rf"^DROP TABLE IF EXISTS {_STATE}$",
    "rename ..__next into place": rf"^ALTER TABLE {_NEXT} RENAME TO ",
    **{f"token: {step}": pattern for step, pattern in _TOKEN_STEPS.items()},
}


def _spark_killed(matrix: Matrix, store: SnapshotStore, step: str, pattern: str, tick: int, **opts: Any) -> None:
    """A run killed right after the first statement matching ``pattern`` (the run first recovers what the run
    before it left: a half-done swap, a pending plan)."""
    killable = matrix.killable
    killable.kill_after = re.compile(pattern)
    KillableMemoryFileSystem.arm(0, "never")
    try:
        with pytest.raises(Killed):
            matrix.run(store, tick, **opts)
        assert killable.kill_after is None, f"the run never reached: {step}"
    finally:
        killable.kill_after = None
        KillableMemoryFileSystem.arm(0, "never")
    store.break_lock()


@pytest.mark.spark
@pytest.mark.timeout(900)
def test_spark_killed_at_every_statement_of_the_swap_then_converges(
    spark_engine: Engine, stopchurn_sandbox_factory: Any
) -> None:
    """Spark has no transactions: the settle rewrites the state table into ``..__next`` and swaps it in (DROP, then
    RENAME), each a statement of its own. One run after another dies right after each of them (so each run also
    recovers what the one before left, a swap stopped between DROP and RENAME included); then a clean run makes
    StopChurn equal to the source, and the next sends nothing."""
    matrix = Matrix(spark_engine, stopchurn_sandbox_factory(record=True), _killable_spark())
    KillableMemoryFileSystem.arm(0, "never")
    store = _store()
    frame = table(24)
    matrix.engine.load(frame)
    matrix.run(store, 0)
    for tick, (step, pattern) in enumerate(SETTLE_STEPS.items(), start=1):
        frame = churn(frame, tick)
        matrix.engine.load(frame)
        # the source churns on while the killed runs commit nothing: more than half the rows go in the end
        _spark_killed(matrix, store, step, pattern, tick, allow_large_changes=True)
    frame = churn(frame, 99)
    matrix.engine.load(frame)
    matrix.run(store, 20, allow_large_changes=True)
    assert_sandbox_matches(matrix.sb, frame)
    assert store.pending_plan() is None
    again = matrix.run(store, 21)
    assert (again.inserted, again.updated, again.deleted, again.chunks) == (0, 0, 0, 0)


@pytest.mark.spark
@pytest.mark.timeout(900)
def test_spark_baseline_killed_at_every_statement_then_converges(
    spark_engine: Engine, stopchurn_sandbox_factory: Any
) -> None:
    """StopChurn holds the table and its state was reset: the runs recording it without sending die right after
    each statement of the rebuild and swap in turn; then a retry completes it having sent nothing, and a run on a
    moved source makes StopChurn equal to it."""
    matrix = Matrix(spark_engine, stopchurn_sandbox_factory(record=True), _killable_spark())
    KillableMemoryFileSystem.arm(0, "never")
    store = _store()
    frame = churn(table(24), 1)
    matrix.engine.load(frame)
    matrix.run(store, 0)
    reconcile(matrix.source(), store, options(), action="reset")
    requests = update_requests(matrix.sb)
    for tick, (step, pattern) in enumerate(BASELINE_STEPS.items(), start=1):
        _spark_killed(matrix, store, step, pattern, tick, initial_load="baseline")
    matrix.run(store, 20, initial_load="baseline")
    assert update_requests(matrix.sb) == requests
    frame = churn(frame, 2)
    matrix.engine.load(frame)
    matrix.run(store, 21, initial_load="baseline")
    assert_sandbox_matches(matrix.sb, frame)
    assert store.pending_plan() is None
    again = matrix.run(store, 22)
    assert (again.inserted, again.updated, again.deleted, again.chunks) == (0, 0, 0, 0)
