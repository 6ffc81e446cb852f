"""Peak memory of a DuckDB warehouse churn run, measured in a fresh child process against the sandbox on 127.0.0.1.

DuckDB runs in the worker: its buffers are bounded by its ``memory_limit``, and everything else the run holds is the
engine's: the plan (every changed row: op, key text, hash, row JSON), the batch being read and encoded, the window
being delivered and the part being staged for the settle. The bound is DuckDB's limit plus a wide multiple of the
changed rows' own text, so it holds on any machine and under any load: it catches a run that holds whole extra
copies of its changes again, not a few megabytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROWS = 48_000  # each with about 2 kB of text: 82 MB of changed text (40k updated rows), 8k rows deleted
LIMIT_MB = 160  # DuckDB's memory_limit: its buffers count in the worker's RSS, up to this

_CHILD = r"""
import gc, json, sys
from pathlib import Path
import duckdb
from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, WarehouseSource, run_warehouse_sync

url, token, root, db, step = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


con = duckdb.connect(db, config={"memory_limit": f"{int(sys.argv[6])}MB", "threads": 1})
opts = SyncOptions(brand_id=7, table_name="duckmem", key_columns=("id",), chunk_size=500, max_concurrent_requests=2,
                   max_delete_fraction=1.0, initial_load="baseline" if step == "baseline" else "send")
client = StopChurnClient(url, token, timeout=120.0)
gc.collect()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM: the peak from here on is the run's
try:
    source = WarehouseSource("SELECT * FROM src", DuckDBWarehouse(con))
    store = SnapshotStore(Path(root), 7, "duckmem")
    summary = run_warehouse_sync(source, store, client, opts, run_ms=1_700_000_000_000)
finally:
    client.close()
    con.close()
print(json.dumps({"peak_above": status("VmHWM") - before,
                  "counts": [summary.inserted, summary.updated, summary.deleted]}))
"""


def _child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc/self/clear_refs").exists(),
    reason="needs Linux's VmHWM reset",
)
def test_a_duckdb_churn_run_holds_its_changes_about_once(stopchurn_sandbox: Any, tmp_path: Path) -> None:
    """A churn run that changes 82 MB of text (40k of 48k rows of about 2 kB; the other 8k deleted) peaks below
    DuckDB's memory_limit plus five times that text above what the process held before it. It measured 660 MB
    (6.1x beside the limit) when DuckDB handed out 50k-row batches (the whole change set in one), the plan was
    sorted as a whole, delivered in one window of update JSON and request bodies and staged whole for the settle;
    about 480 MB (3.9x) now."""
    import duckdb

    db = str(tmp_path / "w.duckdb")
    with duckdb.connect(db) as con:
        con.execute(
            "CREATE TABLE src AS SELECT i AS id, 'n' || i AS name, repeat(md5(CAST(i AS TEXT)), 64) AS payload, "
            f"i % 7 AS grp FROM range({ROWS}) AS r(i)"
        )
    common = [stopchurn_sandbox.url, stopchurn_sandbox.token, str(tmp_path / "s"), db]
    _child([*common, "baseline", str(LIMIT_MB)])
    with duckdb.connect(db) as con:
        con.execute("UPDATE src SET grp = grp + 100, payload = upper(payload) WHERE id % 6 <> 0")
        con.execute("DELETE FROM src WHERE id % 6 = 0")
        ((changed_bytes,),) = con.execute("SELECT SUM(LENGTH(payload)) FROM src").fetchall()
    got = _child([*common, "churn", str(LIMIT_MB)])
    assert got["counts"] == [0, ROWS - ROWS // 6, ROWS // 6]
    # delivered in several windows of wide rows: every updated row arrived, with its new text
    held = stopchurn_sandbox.rows(7, "duckmem")
    assert sorted(int(r["id"]) for r in held) == [i for i in range(ROWS) if i % 6]
    assert all(r["payload"] == r["payload"].upper() and r["grp"] >= 100 for r in held)
    engine = got["peak_above"] - LIMIT_MB * 2**20  # what DuckDB's limit does not account for
    assert engine < 5 * changed_bytes, (
        f"peak {got['peak_above'] / 2**20:.0f} MB above start: {engine / changed_bytes:.2f}x the changed rows' text "
        f"beside DuckDB's {LIMIT_MB} MB"
    )


def test_batches_are_re_cut_by_bytes_and_keep_every_row_in_order() -> None:
    """Wide rows are sliced and narrow batches joined, so each batch encoded holds about the given bytes."""
    import pyarrow as pa

    from airflow_provider_stopchurn.warehouse.changes import sized

    narrow = [pa.record_batch({"id": list(range(i * 100, i * 100 + 100)), "s": ["x" * 50] * 100}) for i in range(30)]
    wide = pa.record_batch({"id": list(range(3000, 4000)), "s": ["y" * 1000] * 1000})
    out = list(sized([*narrow, wide], 20_000, rows=250))
    assert pa.Table.from_batches(out).column("id").to_pylist() == list(range(4000))
    assert all(b.num_rows <= 250 and b.nbytes <= 20_000 for b in out)
    assert len([b for b in out if b.column("id")[0].as_py() < 3000]) == 15  # 30 narrow batches joined in pairs
    typed = [pa.record_batch({"v": pa.nulls(3)}), pa.record_batch({"v": ["a", "b"]}), pa.record_batch({"v": ["c"]})]
    joined = list(sized(typed, 10_000))  # batches of other types are never joined: each keeps its own
    assert [b.schema.field("v").type for b in joined] == [pa.null(), pa.string()]
    assert [b.num_rows for b in joined] == [3, 3]
    empty = pa.record_batch({"id": pa.array([], pa.int64())})
    assert [b.num_rows for b in sized([empty], 100)] == [0]  # an empty result still names its columns


def test_a_delivery_window_of_wide_rows_is_cut_to_whole_chunks() -> None:
    import polars as pl

    from airflow_provider_stopchurn.options import SyncOptions
    from airflow_provider_stopchurn.warehouse.changes import window_rows, windows

    n = 2_000
    frame = pl.DataFrame(
        {
            "op": ["update"] * n,
            "__sc_key_0": [str(i) for i in range(n)],
            "hash": ["h"] * n,
            "created_at": [1] * n,
            "updated_at": [2] * n,
            "row": [f'{{"id": {i}, "s": "{"z" * 1000}"}}' for i in range(n)],
        }
    )
    opts = SyncOptions(brand_id=7, table_name="t", chunk_size=100, window_rows=1_500)
    assert window_rows(frame, opts, None) == 1_500  # no bound: window_rows, as on the local path
    assert window_rows(frame, opts, 10**9) == 1_500
    assert window_rows(frame, opts, 350_000) == 300  # whole chunks of about 1 kB rows
    assert window_rows(frame, opts, 1) == 100  # at least one chunk
    got = list(windows(frame, opts, 350_000))
    assert [w.offset for w in got] == list(range(0, n, 300))
    assert [c for w in got for c in w.chunks] == [(a, a + 100) for a in range(0, n, 100)]
    assert pl.concat([w.updates for w in got]).len() == n


class _Killed(BaseException):
    """The worker dies here (a BaseException, as a kill: nothing in the engine may catch it)."""


def _dies_at(step: str, nth: int) -> type:
    """A DuckDB warehouse that dies at the ``nth`` call of ``step`` that touches the settle's part table."""
    from airflow_provider_stopchurn.warehouse import DuckDBWarehouse

    class Dying(DuckDBWarehouse):
        calls = 0

        def _maybe_die(self, text: str) -> None:
            if "__stopchurn_staging_part" in text:
                type(self).calls += 1
                if type(self).calls == nth:
                    raise _Killed

        def load(self, table: str, data: Any) -> None:
            if step == "load":
                self._maybe_die(table)
            super().load(table, data)

        def execute(self, statements: Any) -> None:
            if step == "execute":
                self._maybe_die(" ".join(statements))
            super().execute(statements)

    return Dying


@pytest.mark.parametrize(("step", "nth"), [("load", 1), ("execute", 1), ("execute", 2)])
def test_a_settle_staged_in_parts_killed_part_way_converges(
    stopchurn_sandbox_factory: Any, tmp_path: Path, step: str, nth: int
) -> None:
    """A settle of more than one part's bytes stages a part at a time; a worker killed between two parts leaves the
    plan pending, the next run settles it and sends only what changed since, and a third run sends nothing."""
    import duckdb

    from airflow_provider_stopchurn.options import SyncOptions
    from airflow_provider_stopchurn.store import SnapshotStore
    from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, WarehouseSource, run_warehouse_sync

    sb = stopchurn_sandbox_factory()
    rows = 12_000  # about 2 kB of row JSON each: a 25 MB plan, two parts of DuckDB's 16 MB
    db = str(tmp_path / "w.duckdb")
    with duckdb.connect(db) as con:
        con.execute(
            "CREATE TABLE src AS SELECT i AS id, repeat(md5(CAST(i AS TEXT)), 64) AS payload "
            f"FROM range({rows}) AS r(i)"
        )
    store = SnapshotStore(tmp_path / "s", 7, "parts")

    def run(warehouse: type, tick: int, **kw: Any) -> Any:
        con = duckdb.connect(db)
        try:
            opts = SyncOptions(brand_id=7, table_name="parts", key_columns=("id",), chunk_size=1_000, **kw)
            source = WarehouseSource("SELECT * FROM src", warehouse(con))
            client = StopChurnClient(sb.url, sb.token)
            try:
                return run_warehouse_sync(source, store, client, opts, run_ms=1_700_000_000_000 + tick)
            finally:
                client.close()
        finally:
            con.close()

    from airflow_provider_stopchurn.api.client import StopChurnClient

    first = run(DuckDBWarehouse, 1)
    assert first.inserted == rows
    with duckdb.connect(db) as con:
        con.execute("UPDATE src SET payload = upper(payload)")
    with pytest.raises(_Killed):
        run(_dies_at(step, nth), 2)
    assert store.pending_plan() is not None
    with duckdb.connect(db) as con:
        con.execute("UPDATE src SET payload = lower(payload) WHERE id = 0")  # changed again meanwhile
    after = run(DuckDBWarehouse, 3)
    assert after.updated == 1  # only the row changed since; the killed run's rows were settled as sent
    assert store.pending_plan() is None
    again = run(DuckDBWarehouse, 4)
    assert again.inserted + again.updated + again.deleted == 0
    held = {int(r["id"]): r["payload"] for r in sb.rows(7, "parts")}
    with duckdb.connect(db) as con:
        assert held == dict(con.execute("SELECT id, payload FROM src").fetchall())
