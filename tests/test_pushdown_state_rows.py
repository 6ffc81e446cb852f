"""What the state table keeps of each delivered row (``warehouse/rows.py``): its values, the constant JSON text
around them kept once in the bookkeeping row, and a delete that sends the row exactly as it was delivered.

Every delete's row is compared, byte for byte, with the row the same key was last sent with (the request bodies
the sandbox received), for every type the warehouse path sends: integers past 2**53, floats, decimals (as numbers
and as strings), dates, timestamps with a zone, nested JSON, unicode and control characters, booleans, NULLs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from helpers_sync import BRAND, T0, TABLE, RecordingSender, make_client, options
from hypothesis import given, settings
from hypothesis import strategies as st
from pushdown_engines import Engine, local_engine  # noqa: F401 - the engine fixture

from airflow_provider_stopchurn.encode.records import encode_rows
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.warehouse import rows as R

STATE = f"stopchurn_state.b{BRAND}_{TABLE}"
QUERY = "SELECT * FROM src"
#: an update's row and key as the body holds them (the row's text is everything between the table name and the
#: envelope's createdAt: a row's own text never holds the envelope's unescaped quotes)
_UPDATE = re.compile(
    r'\{"type":"(insert|update|delete)","data":\{"brandId":\d+,"tableName":"[^"]*","data":(\{.*?\}),'
    r'"createdAt":\d+,"updatedAt":\d+\}\}'
)

#: one row per kind of value, and a row of NULLs; the texts hold what a JSON text escapes (quotes, backslashes,
#: the separators the state table cuts values with) and what looks like the row's own keys
_ROWS = {
    "postgres": """
CREATE TABLE src AS SELECT * FROM (VALUES
  (1, 4611686018427387905::bigint, 0.1 + 0.2, 12345.6789::numeric(14,4), DATE '2026-03-29',
   TIMESTAMPTZ '2026-03-29 01:30:00.123+02', '{"a": [1, 2.50, {"b": null}], "c": "é,\\"note\\":"}'::jsonb,
   'é 😀 "q" \\ ,"note": ' || chr(31) || chr(30) || chr(10), true),
  (2, -9007199254740993::bigint, 1e-300::float8, -0.0001::numeric(14,4), DATE '1969-12-31',
   TIMESTAMPTZ '1969-12-31 23:59:59.999+00', '[]'::jsonb, '', false),
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)
) AS t(id, big, ratio, amount, day, seen_at, meta, note, flag)""",
    "duckdb": """
CREATE TABLE src AS SELECT * FROM (VALUES
  (1, 4611686018427387905::BIGINT, 0.1 + 0.2, 12345.6789::DECIMAL(14,4), DATE '2026-03-29',
   TIMESTAMPTZ '2026-03-29 01:30:00.123+02', '{"a": [1, 2.50, {"b": null}], "c": "é,\\"note\\":"}'::JSON,
   'é 😀 "q" \\ ,"note": ' || chr(31) || chr(30) || chr(10), true),
  (2, -9007199254740993::BIGINT, 1e-300::DOUBLE, -0.0001::DECIMAL(14,4), DATE '1969-12-31',
   TIMESTAMPTZ '1969-12-31 23:59:59.999+00', '[]'::JSON, '', false),
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)
) AS t(id, big, ratio, amount, day, seen_at, meta, note, flag)""",
}


class _World:
    def __init__(self, engine: Engine, sb: SandboxServer, tmp_path: Path) -> None:
        self.engine, self.sb = engine, sb
        self.store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
        self.sender = RecordingSender(make_client(sb))
        self.tick = 0

    def run(self, **opts: Any) -> Any:
        self.tick += 1
        opts.setdefault("chunk_size", 4)
        opts.setdefault("max_concurrent_requests", 1)
        opts.setdefault("allow_large_changes", True)
        source = WarehouseSource(QUERY, self.engine.warehouse(), state_schema="stopchurn_state")
        return run_warehouse_sync(source, self.store, self.sender, options(**opts), run_ms=T0 + 1000 * self.tick)

    def sent(self) -> list[tuple[str, str, str]]:
        """(op, id, the row's exact text) of every update sent so far, in order."""
        out = []
        for body in self.sender.bodies:
            for op, row in _UPDATE.findall(body.decode()):
                key = re.match(r'\{"id":(\d+)', row)
                assert key is not None, row
                out.append((op, key.group(1), row))
        return out

    def kept(self) -> list[str]:
        return [str(r) for (r,) in self.engine.rows(f'SELECT "_stopchurn_row" FROM {STATE}')]


def _deletes_match_the_rows_delivered(world: _World, rejected: tuple[str, ...] = ()) -> int:
    """Every delete's row is the text its key was last delivered with (insert or update), byte for byte.
    ``rejected``: keys whose update StopChurn refused (the row it holds is the one before)."""
    last: dict[str, str] = {}
    deletes = 0
    for op, key, row in world.sent():
        if op == "update" and key in rejected:
            continue
        if op == "delete":
            assert row == last[key], f"delete of {key} sent {row!r}, delivered {last[key]!r}"
            deletes += 1
        last[key] = row
    return deletes


def _as_an_older_version_left_it(world: _World) -> None:
    """The state table as a version before the layouts writes it: the bookkeeping table without their column,
    every row its JSON text (the text it was delivered with)."""
    world.engine.execute(f"ALTER TABLE {STATE}__meta DROP COLUMN row_layouts")
    for _, key, row in world.sent():
        text = row.replace("'", "''")
        world.engine.execute(f"UPDATE {STATE} SET \"_stopchurn_row\" = '{text}' WHERE id = '{key}'")
    assert all(r.startswith("{") for r in world.kept())


@pytest.fixture
def world(engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path) -> _World:
    engine.execute(_ROWS[engine.name])
    return _World(engine, stopchurn_sandbox_factory(record=True), tmp_path)


@pytest.mark.parametrize("decimal_as_string", [False, True])
def test_a_delete_sends_every_type_exactly_as_delivered(world: _World, decimal_as_string: bool) -> None:
    first = world.run(decimal_as_string=decimal_as_string)
    assert first.inserted == 3
    kept = world.kept()
    # kept as values: no row holds its column names (the regression: the whole JSON object was kept)
    assert kept and all(re.match("^[0-9a-f]{4,}\x1e", r) for r in kept), kept
    assert not any('"note":' in r.split("\x1e", 1)[0] for r in kept)
    world.engine.execute("DELETE FROM src")
    gone = world.run(decimal_as_string=decimal_as_string)
    assert gone.deleted == 3
    assert _deletes_match_the_rows_delivered(world) == 3


def test_a_baseline_keeps_rows_that_a_delete_sends_as_a_first_load_would_have_sent_them(
    world: _World, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A baseline writes each row as the state table keeps it straight from its values (no row JSON is made):
    a delete after it sends the row a first load sends for the same source."""
    world.run()
    inserted = {key: row for _, key, row in world.sent()}
    world.engine.execute("DROP SCHEMA stopchurn_state CASCADE")
    recorded = _World(world.engine, stopchurn_sandbox_factory(), tmp_path / "baseline")
    assert recorded.run(initial_load="baseline").baseline
    assert all(re.match("^[0-9a-f]{4,}\x1e", r) for r in recorded.kept())
    world.engine.execute("DELETE FROM src")
    assert recorded.run().deleted == 3
    deleted = {key: row for op, key, row in recorded.sent() if op == "delete"}
    assert deleted == inserted


def test_rows_of_another_layout_after_a_schema_change_are_deleted_as_delivered(world: _World) -> None:
    """``update_all`` sends every row with the new column; a rejected one keeps the row it had (the old layout).
    Deleting all of them then sends each row as it was last delivered, whichever layout keeps it."""
    world.run()
    world.engine.execute("ALTER TABLE src ADD COLUMN tier INTEGER")
    world.engine.execute("UPDATE src SET tier = id * 10")
    world.sb.reject_ids(["2"])
    changed = world.run(on_schema_change="update_all", chunk_size=1, on_rejected_rows="quarantine")
    world.sb.reject_ids(())
    assert changed.updated == 2 and changed.schema_change is not None
    tags = {r.split("\x1e", 1)[0] for r in world.kept()}
    assert len(tags) == 2  # row 2 is still kept by the first layout
    world.engine.execute("DELETE FROM src")
    gone = world.run()
    assert gone.deleted == 3
    assert _deletes_match_the_rows_delivered(world, rejected=("2",)) == 3


def test_a_state_table_of_json_texts_keeps_working_and_is_given_layouts(world: _World) -> None:
    """A state table written before the layouts (every row its JSON text; a bookkeeping table without their
    column): its rows are deleted exactly as delivered, the column is added on the next run, and the rows that
    run writes are kept as values beside the old JSON texts."""
    world.run()
    _as_an_older_version_left_it(world)
    world.engine.execute("DELETE FROM src WHERE id = 1")
    world.engine.execute("UPDATE src SET flag = NOT flag WHERE id = 2")
    changed = world.run()
    assert (changed.deleted, changed.updated) == (1, 1)
    kept = sorted(world.kept())
    assert len(kept) == 2 and kept[0][0].isalnum() and kept[1].startswith("{"), kept  # row 2 values, row 3 JSON
    assert world.engine.rows(f'SELECT "row_layouts" FROM {STATE}__meta')[0][0]
    world.engine.execute("DELETE FROM src")
    assert world.run().deleted == 2
    assert _deletes_match_the_rows_delivered(world) == 3


# --- the representation itself ----------------------------------------------------------------------------------
_NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6)
_VALUES = st.one_of(st.none(), st.text(max_size=12), st.sampled_from([',"a":', "}", "{", "\x1f", "\x1e", '"']))


@settings(max_examples=150, deadline=None)
@given(
    names=st.lists(_NAMES, min_size=1, max_size=5, unique=True),
    nest=st.booleans(),
    data=st.data(),
)
def test_compact_then_expand_gives_each_row_back_byte_for_byte(names: list[str], nest: bool, data: Any) -> None:
    rows_n = data.draw(st.integers(1, 4))
    frame = pl.DataFrame({n: pl.Series([data.draw(_VALUES) for _ in range(rows_n)], dtype=pl.String) for n in names})
    kinds = {n: "json" if i % 2 else "string" for i, n in enumerate(names)}
    json_kinds = [n for n in names if kinds[n] == "json"]
    # a JSON column holds JSON text: a string's JSON, so a nested value may hold what a key looks like
    frame = frame.with_columns(pl.struct(pl.col(n).alias("v")).struct.json_encode().alias(n) for n in json_kinds)
    try:
        rows = encode_rows(frame, kinds, nest_dotted_columns=nest)
    except ValueError:  # names that clash when nested: no row JSON to keep
        return
    texts = R.layout(frame.columns, nest_dotted_columns=nest)
    tag = R.tag_of(texts)
    kept = R.compact(rows, texts, tag)
    assert R.expand(kept, {tag: texts}).to_list() == rows.to_list()
    assert R.expand(rows, {}).to_list() == rows.to_list()  # JSON texts are read as they are
    fitted = [k for k, r in zip(kept.to_list(), rows.to_list(), strict=True) if "\x1e" not in r and "\x1f" not in r]
    assert all(k.startswith(tag + "\x1e") for k in fitted)


@pytest.mark.postgres
def test_the_state_table_shrinks_on_postgres(
    postgres_database: Any, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """The benchmark's 12 columns on 5,000 rows: the state table (with its key index) was 2.4x the source (its
    primary key included) while it kept every row's JSON object; kept as values it is 1.6x (1.4x at 1M rows, where
    the pages are fuller: benchmarks/RESULTS-pushdown.md). Sizes, not times: the same on every machine."""
    engine = Engine("postgres", postgres_database)
    engine.execute(
        "CREATE TABLE src AS SELECT g AS id, (g * 7) % 1000 AS quantity, round((g % 997) * 0.37, 2) AS price, "
        "(g % 1009) / 1009.0::float8 AS score, ((g * 13) % 100000) / 100.0::numeric(14,2) AS balance, "
        "'Name ' || (g % 225) AS name, 'name' || (g % 225) || '.' || g || '@example.com' AS email, "
        "(ARRAY['active','trial','paused','churned','pending'])[g % 5 + 1] AS status, "
        "TIMESTAMPTZ '2020-01-01' + g * INTERVAL '17 minutes' AS signup_at, "
        "TIMESTAMPTZ '2020-02-01' + g * INTERVAL '19 minutes' AS last_seen_at, g % 10 = 0 AS is_vip, "
        "jsonb_build_object('email', g % 3 = 0, 'sms', g % 7 = 0, 'frequency', "
        "(ARRAY['daily','weekly','monthly','never'])[g % 4 + 1]) AS preferences FROM generate_series(1, 5000) AS g"
    )
    engine.execute("ALTER TABLE src ADD PRIMARY KEY (id)")
    world = _World(engine, stopchurn_sandbox_factory(), tmp_path)
    assert world.run(initial_load="baseline").baseline
    engine.execute(f"VACUUM {STATE}")
    ((state, source),) = engine.rows(f"SELECT pg_total_relation_size('{STATE}'), pg_total_relation_size('src')")
    assert state <= 1.9 * source, (state, source)


@pytest.mark.postgres
def test_a_role_that_may_not_alter_the_bookkeeping_table_keeps_rows_as_json(
    postgres_database: Any, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """An older bookkeeping table (no layouts' column), run by a role that may read and write the state tables
    but not alter them: the column cannot be added, so every row stays JSON text, and the runs go on (a delete
    still sends the row as delivered)."""
    from airflow_provider_stopchurn.source.sql import postgres_uri
    from airflow_provider_stopchurn.warehouse import PostgresWarehouse

    engine = Engine("postgres", postgres_database)
    engine.execute(_ROWS["postgres"])
    world = _World(engine, stopchurn_sandbox_factory(record=True), tmp_path)
    world.run()
    _as_an_older_version_left_it(world)
    engine.execute("DROP ROLE IF EXISTS sc_writer")
    engine.execute("CREATE ROLE sc_writer LOGIN")
    engine.execute("GRANT USAGE ON SCHEMA stopchurn_state TO sc_writer")
    engine.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA stopchurn_state TO sc_writer")
    engine.execute("GRANT SELECT ON src TO sc_writer")
    server = engine.handle
    uri = postgres_uri(host=server.host, port=server.port, login="sc_writer", password=None, database=server.dbname)
    for tick, change in enumerate(("UPDATE src SET flag = NOT flag WHERE id = 2", "DELETE FROM src"), start=10):
        engine.execute(change)
        source = WarehouseSource(QUERY, PostgresWarehouse(uri), state_schema="stopchurn_state")
        opts = options(chunk_size=4, max_concurrent_requests=1, allow_large_changes=True)
        summary = run_warehouse_sync(source, world.store, world.sender, opts, run_ms=T0 + tick)
        assert summary.updated + summary.deleted >= 1
        assert all(r.startswith("{") for r in world.kept())  # the updated row too: no layouts to keep it by
    assert _deletes_match_the_rows_delivered(world) == 3
