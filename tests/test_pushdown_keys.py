"""The warehouse diff's key checks (DuckDB, PostgreSQL): a source with a NULL key or a key held by more than one row
is refused before anything is sent, with the message naming them, whether the narrow diff (a run that may write)
or a query of its own (a dry run) finds it; and a churn run reads the source for its diff and key checks once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from helpers_sync import BRAND, T0, TABLE, make_client, options
from pushdown_engines import Engine, engine_fixture, local_engine  # noqa: F401 - local_engine: the engine fixture
from test_pushdown import table
from test_pushdown_narrow import _scratch_tables
from test_pushdown_recovery import run_on

from airflow_provider_stopchurn.exceptions import SafeguardError
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync

COLUMNS = "name, score, active, seen, plan"
#: (source query over the synced ``src``, the message's first line) per way of breaking the keys
BROKEN = {
    "a NULL key": (
        f"SELECT * FROM src UNION ALL SELECT CAST(NULL AS BIGINT) AS id, {COLUMNS} FROM src WHERE id = 1",
        re.escape(f"1 source rows of {TABLE!r} have a NULL in key column(s) ['id']; nothing was sent. ")
        + "Every row needs its key.",
    ),
    # both copies unchanged: no changed row shows them, only the count of unchanged rows
    "unchanged rows repeated": (
        "SELECT * FROM src UNION ALL SELECT * FROM src WHERE id IN (1, 2)",
        rf"2 keys of {TABLE!r} are held by more than one source row \(for example \[\(\d,\), \(\d,\)\]\); "
        r"nothing was sent\. Keys must be unique\.",
    ),
    "a changed and an unchanged row of one key": (
        "SELECT * FROM src UNION ALL SELECT id, name || ' again', score, active, seen, plan FROM src WHERE id = 3",
        rf"1 keys of {TABLE!r} are held by more than one source row \(for example \[\(3,\)\]\); "
        r"nothing was sent\. Keys must be unique\.",
    ),
    "a new key twice": (
        f"SELECT * FROM src UNION ALL SELECT 100 AS id, {COLUMNS} FROM src WHERE id IN (4, 5)",
        rf"1 keys of {TABLE!r} are held by more than one source row \(for example \[\(100,\)\]\); "
        r"nothing was sent\. Keys must be unique\.",
    ),
}


def _run(engine: Engine, store: SnapshotStore, sb: Any, tick: int, sql: str, **opts: Any) -> Any:
    return run_warehouse_sync(
        WarehouseSource(sql, engine.warehouse()), store, make_client(sb), options(**opts), run_ms=T0 + tick
    )


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_null_or_repeated_key_is_refused_before_anything_is_sent(
    case: str, engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """The narrow diff finds them in its own pass; the message is the one the key check's query always gave, in a
    real run and a dry run alike, and nothing is sent, written or left behind. Fixed, the next run goes on."""
    sql, message = BROKEN[case]
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    engine.load(table(30))
    run_on(engine, store, make_client(sb), 1)
    sb.reset()
    version = store.read_current()["version"]
    for dry_run in (True, False):
        with pytest.raises(SafeguardError) as err:
            _run(engine, store, sb, 2, sql, dry_run=dry_run)
        assert re.fullmatch(message, str(err.value)), str(err.value)
    assert sb.received() == []
    assert store.read_current()["version"] == version
    assert store.pending_plan() is None
    assert _scratch_tables(engine) == []
    summary = _run(engine, store, sb, 3, "SELECT * FROM src")  # the source fixed: nothing changed since
    assert (summary.inserted, summary.updated, summary.deleted) == (0, 0, 0)


#: a source that counts how often it is read (a sequence, outside any transaction)
COUNTED = """
CREATE SEQUENCE reads;
CREATE FUNCTION counted_src() RETURNS SETOF src LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nextval('reads');
    RETURN QUERY SELECT * FROM src;
END $$;
"""


@pytest.mark.postgres
def test_a_churn_run_reads_the_source_for_its_diff_and_key_checks_once(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The narrow diff checks the keys in its own pass, and keeps the changed rows' columns from it: the source is
    read once, by the diff, not again for the key checks (a GROUP BY over the whole source) or the changed rows."""
    engine = next(engine_fixture("postgres", request, tmp_path))
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    engine.load(table(30))
    engine.execute(COUNTED)
    sql = "SELECT * FROM counted_src()"
    _run(engine, store, sb, 1, sql)

    def reads() -> int:
        ((value, called),) = engine.rows("SELECT last_value, is_called FROM reads")
        return int(value) if called else 0

    engine.execute("UPDATE src SET score = score + 1 WHERE id % 5 = 0")
    engine.execute("DELETE FROM src WHERE id = 3")
    before = reads()
    summary = _run(engine, store, sb, 2, sql)
    assert (summary.inserted, summary.updated, summary.deleted) == (0, 6, 1)
    assert reads() - before == 1


#: a key column whose SQL equality is wider than its text: 0.0 and -0.0 are one key to GROUP BY (the key check's
#: query, PostgreSQL and DuckDB alike) but two texts ('0' / '-0', '0.0' / '-0.0')
SIGNED_ZERO = (
    "SELECT CASE WHEN id = 1 THEN CAST(0.0 AS DOUBLE PRECISION) ELSE CAST(id AS DOUBLE PRECISION) END AS id, "
    f"{COLUMNS} FROM src"
)


def test_a_key_equal_in_sql_but_not_as_text_is_refused_by_a_run_as_by_a_dry_run(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """The source's key check groups the key columns themselves: 0.0 and -0.0 are one key held by two rows, and
    the dry run refuses the source for it. The run that may write must refuse it too (before anything is sent)
    and not deliver the second row as a key of its own."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    engine.load(table(30))
    _run(engine, store, sb, 1, SIGNED_ZERO)
    sb.reset()
    version = store.read_current()["version"]
    doubled = f"{SIGNED_ZERO} UNION ALL SELECT CAST('-0.0' AS DOUBLE PRECISION) AS id, {COLUMNS} FROM src WHERE id = 1"
    message = rf"1 keys of {TABLE!r} are held by more than one source row .*nothing was sent\. Keys must be unique\."
    for dry_run in (True, False):
        with pytest.raises(SafeguardError, match=message):
            _run(engine, store, sb, 2, doubled, dry_run=dry_run)
    assert sb.received() == []
    assert store.read_current()["version"] == version
