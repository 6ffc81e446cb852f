"""A hypothesis state machine over the diff inside the warehouse (DuckDB; PostgreSQL for a few examples).

Between runs the source churns, options change (chunk size, concurrency, rejection policy, a column added under
``on_schema_change='update_all'``), StopChurn starts or stops rejecting some ids, the sandbox injects faults
(500s, dropped connections, acknowledgements lost after the update was applied, 200 HTML pages, 413 for large
bodies), the session time zone of the warehouse changes (the worker's ``TZ`` for DuckDB, the database's default
for PostgreSQL), and a run may be killed at any durable write, of the snapshot store or of the warehouse (the
crash matrix's kill switch). A run may only fail with a delivery error, a rejection or the schema safeguard:
drift between the state table and the store, or a raw database error, is a bug.

Whatever happened, once the faults stop the clean runs leave StopChurn equal to the source, except the rows it
still rejects (each reported), then equal to it once it accepts them, and the run after that sends nothing.
``STOPCHURN_SOAK=long`` runs more and longer examples.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, ClassVar

import duckdb
import numpy as np
import pandas as pd
import pytest
from fault_strategies import fault_configs
from helpers_sync import (
    BRAND,
    T0,
    TABLE,
    Churn,
    assert_sandbox_matches,
    expected_rows,
    make_client,
    options,
    sandbox_rows,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from pushdown_engines import Engine
from test_crash_matrix_object_store import KillableMemoryFileSystem, Killed
from test_pushdown_recovery import KillableDuckDB, _step
from upath import UPath

from airflow_provider_stopchurn.exceptions import DeliveryError, SafeguardError
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.sandbox.pytest_plugin import SANDBOX_TEST_TOKEN
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import PostgresWarehouse, WarehouseSource, run_warehouse_sync

LONG = os.environ.get("STOPCHURN_SOAK") == "long"
QUERY = "SELECT * FROM src"
ZONES = ("UTC", "Europe/Paris", "Asia/Tokyo", "America/St_Johns", "Pacific/Chatham")

faults = fault_configs(body_limits=(900, 2500))


class KillablePostgres(PostgresWarehouse):
    """A PostgreSQL warehouse whose writes (a transaction each) count with the store's and die with it."""

    def execute(self, statements: Any) -> None:
        _step(lambda: PostgresWarehouse.execute(self, statements))

    def load(self, table: str, data: Any) -> None:
        _step(lambda: PostgresWarehouse.load(self, table, data))


def _with_time(frame: pd.DataFrame) -> pd.DataFrame:
    """The churned table with a zoned timestamp (its text depends on the session's zone) and a date."""
    seen = pd.Timestamp("2026-03-29 00:30", tz="UTC") + pd.to_timedelta(frame["qty"].to_numpy() * 37, unit="min")
    return frame.assign(seen=seen, day=seen.date)


class WarehouseRecovery(RuleBasedStateMachine):
    #: the engine's handle (a DuckDB file path, or the PostgreSQL server of the test), set by the test function
    engine: ClassVar[Engine]

    def __init__(self) -> None:
        super().__init__()
        self.sb = SandboxServer(token=SANDBOX_TEST_TOKEN, record=False).start()
        self.tmp = tempfile.TemporaryDirectory()
        KillableMemoryFileSystem.arm(0, "never")
        with warnings.catch_warnings():  # UPath warns once that it has no class of its own for this protocol
            warnings.simplefilter("ignore", UserWarning)
            root = UPath(f"killmem://stopchurn/{uuid.uuid4().hex}")
        self.store = SnapshotStore(root, BRAND, TABLE)
        self.schema = f"state_{uuid.uuid4().hex[:10]}"
        self.churn = Churn(0, 30, with_json=False)
        self.source = _with_time(self.churn.frame)
        self.opts: dict[str, Any] = {"chunk_size": 7, "max_concurrent_requests": 1}
        self.rejected: set[int] = set()
        self.tick = 0
        self.zone = "UTC"

    # --- the world ------------------------------------------------------------------------------------------
    def _load(self) -> None:
        self.engine.load(self.source)

    def _warehouse(self) -> Any:
        if self.engine.name == "duckdb":
            return KillableDuckDB(str(self.engine.handle))
        return KillablePostgres(self.engine.uri())

    def _run(self, **extra: Any) -> Any:
        self.tick += 1
        source = WarehouseSource(QUERY, self._warehouse(), state_schema=self.schema)
        return run_warehouse_sync(
            source,
            self.store,
            make_client(self.sb, max_retries=1),
            options(**{**self.opts, **extra}, allow_large_changes=True),
            run_ms=T0 + 1000 * self.tick,
        )

    def _zone(self, zone: str) -> None:
        self.zone = zone
        if self.engine.name == "duckdb":  # a new DuckDB session takes the process's zone
            os.environ["TZ"] = zone
            time.tzset()
            gc.collect()  # a database instance still referenced would keep the zone it started with
            with duckdb.connect(str(self.engine.handle)) as con:
                assert con.sql("SELECT current_setting('TimeZone')").fetchall() == [(zone,)]
        else:
            self.engine.handle.execute(f"ALTER DATABASE \"{self.engine.handle.dbname}\" SET timezone TO '{zone}'")

    def _try(self, **extra: Any) -> None:
        """A run that may fail the ways a faulty StopChurn, a rejection or a pending schema change make it."""
        with contextlib.suppress(DeliveryError, SafeguardError):
            self._run(**extra)

    # --- rules ----------------------------------------------------------------------------------------------
    @initialize(seed=st.integers(0, 10_000))
    def start(self, seed: int) -> None:
        self.churn = Churn(seed, 30, with_json=False)
        self.source = _with_time(self.churn.frame)
        self._load()

    @rule(deletes=st.floats(0, 0.3), updates=st.floats(0, 0.5), inserts=st.floats(0, 0.3))
    def churn_source(self, deletes: float, updates: float, inserts: float) -> None:
        frame = self.churn.step(deletes=deletes, updates=updates, inserts=inserts)
        extra = [c for c in self.source.columns if c == "extra"]
        self.source = _with_time(frame)
        if extra:
            self.source = self.source.assign(extra=np.arange(len(self.source)) % 4)
        self._load()

    @rule(chunk_size=st.integers(1, 12), concurrency=st.integers(1, 3), policy=st.sampled_from(["fail", "quarantine"]))
    def change_options(self, chunk_size: int, concurrency: int, policy: str) -> None:
        self.opts.update(chunk_size=chunk_size, max_concurrent_requests=concurrency, on_rejected_rows=policy)

    @rule(data=st.data())
    def reject_some(self, data: st.DataObject) -> None:
        ids = self.source["id"].tolist()
        picked = data.draw(st.lists(st.sampled_from(ids), max_size=3)) if ids else []
        self.rejected = {int(i) for i in picked}
        self.sb.reject_ids(self.rejected)

    @rule()
    def accept_all(self) -> None:
        self.rejected = set()
        self.sb.reject_ids(())

    @rule(config=faults)
    def set_faults(self, config: FaultConfig) -> None:
        self.sb.set_faults(config)

    @rule(zone=st.sampled_from(ZONES))
    def change_time_zone(self, zone: str) -> None:
        self._zone(zone)

    @rule()
    def run(self) -> None:
        self._try()

    @rule(crash_at=st.integers(1, 14), when=st.sampled_from(["before", "after"]))
    def killed_run(self, crash_at: int, when: str) -> None:
        """The worker dies at a durable write (if the run gets that far); its lock is left behind."""
        KillableMemoryFileSystem.arm(crash_at, when)
        try:
            with contextlib.suppress(Killed):
                self._try()
        finally:
            KillableMemoryFileSystem.arm(0, "never")
        self.store.break_lock()

    @precondition(lambda self: self.tick > 0 and "extra" not in self.source.columns)
    @rule()
    def add_a_column(self) -> None:
        self.source = self.source.assign(extra=np.arange(len(self.source)) % 4)
        self._load()
        self._try(on_schema_change="update_all")

    def teardown(self) -> None:
        try:
            KillableMemoryFileSystem.arm(0, "never")
            self.sb.set_faults(FaultConfig())
            # StopChurn still rejects some ids: every other row is right, every rejected change is reported
            summary = self._run(on_rejected_rows="quarantine", on_schema_change="update_all")
            reported = {r["id"] for r in summary.rejected}
            assert reported <= self.rejected
            want = expected_rows(self.source)
            got = sandbox_rows(self.sb)
            for key, row in want.items():
                if key[1] not in reported:
                    assert got.get(key) == row, (key, got.get(key), row)
            assert {k for k in got if k[1] not in reported} <= set(want)
            # once StopChurn accepts them, one more run delivers them; the run after that sends nothing
            self.sb.reject_ids(())
            self._run(on_schema_change="update_all")
            assert_sandbox_matches(self.sb, self.source)
            assert self.store.pending_plan() is None
            self._zone(ZONES[(ZONES.index(self.zone) + 1) % len(ZONES)])
            again = self._run()
            assert (again.inserted, again.updated, again.deleted, again.chunks) == (0, 0, 0, 0)
        finally:
            self.sb.stop()
            self.tmp.cleanup()
            self._zone("UTC")
            os.environ.pop("TZ", None)
            time.tzset()


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples * (8 if LONG else 1),
        stateful_step_count=steps * (2 if LONG else 1),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@pytest.fixture
def zone_restored() -> Any:
    saved = os.environ.get("TZ")
    yield
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


def test_duckdb_state_machine(tmp_path: Path, zone_restored: None) -> None:
    class OnDuckDB(WarehouseRecovery):
        engine = Engine("duckdb", tmp_path / "machine.duckdb")

    OnDuckDB.TestCase.settings = _settings(25, 12)
    OnDuckDB.TestCase().runTest()


@pytest.mark.postgres
def test_postgres_state_machine(postgres_database: Any, zone_restored: None) -> None:
    class OnPostgres(WarehouseRecovery):
        engine = Engine("postgres", postgres_database)

    OnPostgres.TestCase.settings = _settings(5, 10)
    OnPostgres.TestCase().runTest()
