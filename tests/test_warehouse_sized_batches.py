"""The warehouse re-cuts the batches it reads by bytes before encoding them (``changes.sized``): wide batches are
sliced and consecutive small parts joined. A DB-API warehouse types each ``fetchmany`` batch from its own values
(``source/dbapi_rows.py``), so two consecutive batches may type a column differently: all NULL in one (a null
column) and text in the next, or JSON values (``{KIND_METADATA: JSON_TEXT_KIND}``) in one and plain text in the
other. Joined, the first would make the read fail on every run; the second would encode the rows of one batch as
the other batch's kind (a JSON object sent as its text, a text parsed as JSON). Each row must keep its own batch's
typing: parts of batches typed differently are never joined.

These read real batches from PostgreSQL through the DB-API reader (psycopg2, as a postgres connection the ADBC
reader cannot open is read), with a small ``size`` so the slicing and joining happen at a few megabytes instead
of the 64 MB of a load (the same code at a tenth of the data).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psycopg2
import pyarrow as pa
import pytest
from pushdown_engines import Engine, engine_fixture

from airflow_provider_stopchurn.source.arrow_values import JSON_TEXT_KIND, KIND_METADATA
from airflow_provider_stopchurn.warehouse import DbApiWarehouse
from airflow_provider_stopchurn.warehouse.changes import sized

pytestmark = pytest.mark.postgres

#: one DB-API fetch (source/sql.py BATCH_ROWS): the first batch is rows 1..50,000, the second the rest
FETCH = 50_000


@pytest.fixture
def pg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from engine_fixture("postgres", request, tmp_path)


def _source(pg: Engine, first_doc: str, second_doc: str) -> None:
    """Rows 1..50,000 (the first fetch) with ``first_doc``, then 50,000 more with ``second_doc``: the first
    45,000 of those narrow, the last 5,000 wide (so the second batch is sliced at a few narrow rows first)."""
    pg.handle.execute(
        "CREATE TABLE src AS SELECT i AS id, CASE WHEN i > 95000 THEN repeat('y', 5000) ELSE 'x' END AS w, "
        f"CASE WHEN i <= {FETCH} THEN {first_doc} ELSE {second_doc} END AS doc "
        "FROM generate_series(1, 100000) AS g(i)"
    )


def _kinds(schema: pa.Schema) -> tuple[str, bool]:
    field = schema.field("doc")
    return str(field.type), (field.metadata or {}).get(KIND_METADATA) == JSON_TEXT_KIND


def _recut(pg: Engine) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]], list[int]]:
    """The ``doc`` typing of each row as read (by its fetch) and as re-cut, for the rows' positions."""
    warehouse = DbApiWarehouse(lambda: psycopg2.connect(pg.handle.dsn), "postgres", paramstyle="format")
    try:
        with closing(warehouse.batches("SELECT id, w, doc FROM src ORDER BY id")) as batches:
            read = list(batches)
        assert [b.num_rows for b in read] == [FETCH, FETCH]
        # the first batch is sliced just short of its end, the second's first slice is a few narrow rows
        out = list(sized(iter(read), size=int(read[0].nbytes * 0.97)))
    finally:
        warehouse.close()
    as_read = [k for b in read for k in [_kinds(b.schema)] * b.num_rows]
    recut = [k for b in out for k in [_kinds(b.schema)] * b.num_rows]
    return as_read, recut, [b.num_rows for b in out]


def test_a_null_column_in_one_fetch_and_text_in_the_next_is_read(pg: Engine) -> None:
    """All NULL in the first fetch (a null column), text in the second: parts of the two are never joined."""
    _source(pg, "NULL::text", "'n' || i")
    as_read, recut, sizes = _recut(pg)  # joined, pyarrow refuses the two schemas (ArrowInvalid)
    assert sum(sizes) == 2 * FETCH
    assert recut == as_read


def test_a_json_column_keeps_each_fetchs_kind(pg: Engine) -> None:
    """JSON strings only in the first fetch (plain text), JSON objects in the second (JSON text): the objects
    keep their kind, not the first batch's (they would be sent as strings)."""
    _source(pg, "to_jsonb('plain ' || i)", "jsonb_build_object('a', i)")
    as_read, recut, sizes = _recut(pg)
    assert sum(sizes) == 2 * FETCH
    assert as_read[-1] == ("large_string", True) and as_read[0] == ("large_string", False)
    assert recut == as_read
