"""A DuckDB churn run of wide rows: its delivery is cut into windows of about 32 MB of row JSON and its settle stages
the plan a part at a time (``settle._load_staging``), paths the small tables of the crash matrices never reach.
A failure mid-delivery (in the second window) and a worker killed at each write of the staged parts must still
leave a state from which the next run makes StopChurn equal to the source, and the run after sends nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest
from helpers_sync import BRAND, T0, TABLE, FailAfter, assert_sandbox_matches, make_client, options
from pushdown_engines import Engine
from test_crash_matrix_object_store import KillableMemoryFileSystem, Killed
from test_pushdown_recovery import KillableDuckDB, _store

from airflow_provider_stopchurn.exceptions import DeliveryError
from airflow_provider_stopchurn.sandbox import FaultConfig
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, WarehouseSource, run_warehouse_sync

ROWS = 20_000  # about 2 kB each: about 40 MB of row JSON changed, two delivery windows, three staged parts
CHUNK = 500


def _base() -> pd.DataFrame:
    ids = pd.RangeIndex(1, ROWS + 1)
    return pd.DataFrame({"id": ids, "grp": ids % 7, "payload": [f"{i:08d}" * 250 for i in ids]})


def _churned(base: pd.DataFrame) -> pd.DataFrame:
    """Every sixth row deleted, every other one updated (so StopChurn, which a baseline left empty, ends up
    holding exactly the source)."""
    kept = base[base["id"] % 6 != 0].copy()
    kept["grp"] = kept["grp"] + 100
    kept["payload"] = kept["payload"].str.replace("0", "a")
    return kept.reset_index(drop=True)


def _run(warehouse: Any, store: SnapshotStore, sender: Any, tick: int, **opts: Any) -> Any:
    opts.setdefault("chunk_size", CHUNK)
    opts.setdefault("max_concurrent_requests", 1)
    opts.setdefault("max_delete_fraction", 1.0)
    return run_warehouse_sync(
        WarehouseSource("SELECT * FROM src", warehouse), store, sender, options(**opts), run_ms=T0 + tick
    )


def test_a_failure_in_the_second_window_settles_the_staged_parts(
    stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    engine = Engine("duckdb", tmp_path / "w.duckdb")
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    base = _base()
    engine.load(base)
    assert _run(DuckDBWarehouse(str(engine.handle)), store, make_client(sb), 0, initial_load="baseline").baseline
    second = _churned(base)
    engine.load(second)
    # 40 chunks; the first window holds about 32 of them: the failure comes in the second
    failing = FailAfter(make_client(sb), sb, 36)
    with pytest.raises(DeliveryError):
        _run(DuckDBWarehouse(str(engine.handle)), store, failing, 1)
    assert store.pending_plan() is None
    sb.set_faults(FaultConfig())
    done = _run(DuckDBWarehouse(str(engine.handle)), store, make_client(sb), 2)
    assert done.inserted + done.updated + done.deleted > 0
    assert_sandbox_matches(sb, second)
    again = _run(DuckDBWarehouse(str(engine.handle)), store, make_client(sb), 3)
    assert (again.inserted, again.updated, again.deleted, again.chunks) == (0, 0, 0, 0)


class _Recording(KillableDuckDB):
    """Notes the write number of each statement that appends a staged part (the parts of a settle)."""

    parts: ClassVar[list[int]] = []

    def execute(self, statements: Any) -> None:
        super().execute(statements)
        if any("__stopchurn_staging_part" in s and s.startswith("INSERT") for s in statements):
            type(self).parts.append(KillableMemoryFileSystem.writes)


def test_killed_at_each_staged_part_of_the_settle_then_converges(
    stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    engine = Engine("duckdb", tmp_path / "w.duckdb")
    base = _base()
    second = _churned(base)

    def fresh() -> SnapshotStore:
        KillableMemoryFileSystem.arm(0, "never")
        sb.reset()
        engine.execute("DROP SCHEMA IF EXISTS stopchurn_state CASCADE")
        engine.load(base)
        store = _store()
        _run(_Recording(str(engine.handle)), store, make_client(sb), 0, initial_load="baseline")
        engine.load(second)
        return store

    store = fresh()
    KillableMemoryFileSystem.arm(0, "never")
    _Recording.parts = []
    _run(_Recording(str(engine.handle)), store, make_client(sb), 1)
    parts = list(_Recording.parts)
    assert len(parts) >= 2, "the settle staged the plan whole: the test no longer reaches the parts"
    # before the first part is appended (its load), after each append
    for n, when in [(parts[0] - 1, "after"), *((p, "after") for p in parts)]:
        store = fresh()
        KillableMemoryFileSystem.arm(n, when)
        with pytest.raises(Killed):
            _run(_Recording(str(engine.handle)), store, make_client(sb), 1)
        KillableMemoryFileSystem.arm(0, "never")
        store.break_lock()
        _run(_Recording(str(engine.handle)), store, make_client(sb), 2)
        assert_sandbox_matches(sb, second)
        assert store.pending_plan() is None, (n, when)
        again = _run(_Recording(str(engine.handle)), store, make_client(sb), 3)
        assert again.inserted + again.updated + again.deleted == 0, (n, when)


def test_wide_rows_in_byte_limited_chunks_send_the_local_paths_bodies(
    stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Chunks cut by ``max_chunk_bytes`` (not by ``chunk_size``) run across the 32 MB a DuckDB window holds: a
    window cut there ends a chunk the local path does not end, and every body after it differs. The bodies must
    be the local path's, byte for byte (a window may end only where a chunk of the local path ends)."""
    from helpers_sync import RecordingSender

    from airflow_provider_stopchurn.update.sync import run_sync

    engine = Engine("duckdb", tmp_path / "w.duckdb")
    ids = pd.RangeIndex(1, 17_001)  # about 2 kB each: 35 MB of row JSON, past one 32 MB window
    frame = pd.DataFrame({"id": ids, "payload": [f"{i:08d}" * 250 for i in ids]})
    engine.load(frame)
    bodies: dict[str, list[bytes]] = {}
    for path in ("local", "warehouse"):
        sb = stopchurn_sandbox_factory(record=False)
        sender = RecordingSender(make_client(sb))
        store = SnapshotStore(tmp_path / path, BRAND, TABLE)
        opts = options(chunk_size=500, max_chunk_bytes=61_000, max_concurrent_requests=1)  # 29 rows a body
        if path == "local":
            run_sync(engine.read("SELECT * FROM src"), store, sender, opts, run_ms=T0)
        else:
            run_warehouse_sync(WarehouseSource("SELECT * FROM src", engine.warehouse()), store, sender, opts, run_ms=T0)
        bodies[path] = sender.bodies
    assert len(bodies["local"]) > 500
    assert [len(b) for b in bodies["warehouse"]] == [len(b) for b in bodies["local"]]
    assert bodies["warehouse"] == bodies["local"]
