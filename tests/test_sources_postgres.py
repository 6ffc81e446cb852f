"""Type fidelity of PostgreSQL sources: database value -> ADBC Arrow batches (the operator's ``read_sql``) ->
canonicalize_source -> encode_rows -> JSON.

Each case reads ``SELECT 1 AS id, CAST(<literal> AS <type>) AS v UNION ALL SELECT 2, NULL`` through the
operator's SQL reader (a postgres connection from ``AIRFLOW_CONN_*``, read through ADBC) on a throwaway server
whose session time zone is Asia/Kolkata (+05:30), so a time zone slip cannot hide. ``CASES`` is the matrix the
psycopg path passed; ``EXACT_CASES`` pin what ADBC reads more exactly (interval months, JSON decimals, numeric
arrays) and what it refuses.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from airflow_provider_stopchurn.encode.records import encode_rows
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.operators.stopchurn import read_sql
from airflow_provider_stopchurn.source.canonical import Source, canonicalize_source
from airflow_provider_stopchurn.source.frame import Canonical
from airflow_provider_stopchurn.update.diff import diff_frames

pytestmark = pytest.mark.postgres

UTC = dt.UTC


def ms(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(milliseconds=1)


def day_ms(value: dt.date) -> int:
    return (value - dt.date(1970, 1, 1)).days * 86_400_000


def assert_json_same(actual: Any, expected: Any, where: str = "v") -> None:
    """Equal values of the same JSON type (an int is not a float, a bool is not an int)."""
    if expected is None:
        assert actual is None, f"{where}: {actual!r} is not null"
    elif isinstance(expected, bool):
        assert actual is expected, f"{where}: {actual!r} is not {expected!r}"
    elif isinstance(expected, int):
        assert type(actual) is int and actual == expected, f"{where}: {actual!r} is not the integer {expected}"
    elif isinstance(expected, Decimal):  # rows are parsed with parse_float=Decimal: exact digits
        assert isinstance(actual, int | Decimal) and not isinstance(actual, bool), f"{where}: {actual!r}"
        assert Decimal(actual) == expected, f"{where}: {actual!r} != {expected}"
    elif isinstance(expected, float):
        assert isinstance(actual, int | Decimal) and not isinstance(actual, bool), f"{where}: {actual!r}"
        assert float(actual) == expected, f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, str):
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_json_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: {actual!r}"
        for key, e in expected.items():
            assert_json_same(actual[key], e, f"{where}.{key}")
    else:  # pragma: no cover - a mistake in the table
        raise TypeError(type(expected))


def canonical(source: Source, *, decimal_as_string: bool = False) -> Canonical:
    return canonicalize_source(source, key_columns=["id"], decimal_as_string=decimal_as_string)


def encoded_rows(source: Source, *, decimal_as_string: bool = False) -> list[dict[str, Any]]:
    canon = canonical(source, decimal_as_string=decimal_as_string)
    rows = encode_rows(canon.frame, canon.kinds, nest_dotted_columns=True, decimal_as_string=decimal_as_string)
    return [json.loads(text, parse_float=Decimal) for text in rows.to_list()]


@dataclass(frozen=True)
class Case:
    name: str
    sql_type: str
    literal: str
    expected: Any
    decimal_as_string: bool = False

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("integer", "integer", "42", 42),
    Case("integer-negative", "integer", "-2147483648", -2147483648),
    Case("smallint", "smallint", "-32768", -32768),
    Case("bigint-beyond-2**53", "bigint", "9007199254740993", 9007199254740993),
    Case("bigint-min", "bigint", "-9223372036854775808", -9223372036854775808),
    Case("numeric-wide", "numeric", "12345678901234567890.123456789", Decimal("12345678901234567890.123456789")),
    Case("numeric-scale", "numeric(12,3)", "1.100", Decimal("1.1")),
    Case("numeric-tiny", "numeric", "0.000000000000000000000001", Decimal("1E-24")),
    Case("numeric-negative", "numeric", "-7.5", Decimal("-7.5")),
    Case("numeric-integral", "numeric", "5", Decimal(5)),
    Case("numeric-nan", "numeric", "'NaN'", None),
    Case("numeric-as-string", "numeric", "12345678901234567890.5", "12345678901234567890.5", True),
    Case("real", "real", "1.5", 1.5),
    Case("real-nan", "real", "'NaN'", None),
    Case("real-inf", "real", "'Infinity'", None),
    Case("double", "double precision", "0.1", 0.1),
    Case("double-nan", "double precision", "'NaN'", None),
    Case("double-inf", "double precision", "'Infinity'", None),
    Case("double-minus-inf", "double precision", "'-Infinity'", None),
    Case("boolean-true", "boolean", "true", True),
    Case("boolean-false", "boolean", "false", False),
    Case("text", "text", "'héllo \"quoted\" \\ and\nnew line'", 'héllo "quoted" \\ and\nnew line'),
    Case("varchar", "varchar(10)", "'v'", "v"),
    Case("char-padded", "char(5)", "'ab'", "ab   "),
    Case("uuid", "uuid", "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    Case("date", "date", "'2024-02-29'", day_ms(dt.date(2024, 2, 29))),
    Case("date-before-1970", "date", "'1969-12-31'", -86_400_000),
    Case("timestamp", "timestamp", "'2024-01-02 03:04:05.678901'", ms(dt.datetime(2024, 1, 2, 3, 4, 5, 678000))),
    Case("timestamp-before-1970", "timestamp", "'1969-12-31 23:59:59.999'", -1),
    Case(
        "timestamptz",
        "timestamptz",
        "'2024-01-02 03:04:05.678+02'",
        ms(dt.datetime(2024, 1, 2, 1, 4, 5, 678000, tzinfo=UTC)),
    ),
    Case(
        "timestamptz-dst",
        "timestamptz",
        "'2024-07-01 12:00:00 America/New_York'",
        ms(dt.datetime(2024, 7, 1, 16, 0, tzinfo=UTC)),
    ),
    Case("time", "time", "'13:45:30.123456'", "13:45:30.123456"),
    Case("time-whole", "time", "'07:05:00'", "07:05:00"),
    Case("timetz", "timetz", "'13:45:30.5+02'", "13:45:30.500000+02:00"),
    Case("interval", "interval", "'1 day 02:03:04.5'", "P1DT2H3M4.5S"),
    Case("interval-zero", "interval", "'0'", "PT0S"),
    Case("interval-negative", "interval", "'-1 second'", "-PT1S"),
    Case(
        "json-object",
        "json",
        """'{"b": 1, "a": [1, 2.5, null], "c": {"d": "x"}}'""",
        {"b": 1, "a": [1, Decimal("2.5"), None], "c": {"d": "x"}},
    ),
    Case("jsonb-object", "jsonb", """'{"b": true, "a": {"x": null}}'""", {"b": True, "a": {"x": None}}),
    Case("jsonb-array", "jsonb", """'[1, "x", {"k": false}]'""", [1, "x", {"k": False}]),
    Case("jsonb-empty-object", "jsonb", "'{}'", {}),
    Case("jsonb-bigint", "jsonb", """'{"n": 9007199254740993}'""", {"n": 9007199254740993}),
    Case("text-array", "text[]", """'{a,NULL,"c d"}'""", ["a", None, "c d"]),
    Case("int-array", "int[]", "'{1,2,NULL}'", [1, 2, None]),
    Case("empty-array", "int[]", "'{}'", []),
]


#: What ADBC reads more exactly than psycopg did, and what it refuses.
EXACT_CASES = [
    Case("real-shortest-text", "real", "0.1", 0.1),  # the float4's text, as PostgreSQL prints it (not 0.100000001)
    Case("interval-months", "interval", "'1 mon'", "P1M"),  # psycopg made this 30 days
    Case("interval-years-months-days-time", "interval", "'1 year 2 mons 3 days 04:05:06.5'", "P1Y2M3DT4H5M6.5S"),
    Case("interval-negative-months", "interval", "'-1 year -1 mon'", "-P1Y1M"),
    Case("interval-mixed-signs", "interval", "'1 mon -1 day'", "P1M-1D"),
    Case("interval-mixed-signs-time", "interval", "'-2 mons 3 hours'", "P-2MT3H"),
    Case("interval-days-and-hours-normalised", "interval", "'1 day 25:00:00'", "P2DT1H"),  # months 0: as a timedelta
    Case(
        "json-decimal-exact",
        "jsonb",
        """'{"x": 12345678901234567890.123456789, "y": 0.1, "z": 1.0}'""",
        {"x": Decimal("12345678901234567890.123456789"), "y": Decimal("0.1"), "z": Decimal("1.0")},
    ),
    Case("json-tiny-decimal-exact", "json", "'[1e-400]'", [Decimal("1e-400")]),
    Case("json-duplicate-keys-last-wins", "json", """'{"a": 1, "a": 2}'""", {"a": 2}),
    Case("json-scalar-string", "jsonb", """'"gold"'""", "gold"),
    Case("numeric-array", "numeric[]", "'{1.50,2,NULL}'", [Decimal("1.5"), 2, None]),
    Case("uuid-array", "uuid[]", "'{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}'", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    Case("jsonb-array", "jsonb[]", """ARRAY['{"b": 1, "a": 2}'::jsonb]""", [{"a": 2, "b": 1}]),
    Case("timetz-utc", "timetz", "'07:05:00+00'", "07:05:00+00:00"),
    Case("timetz-negative-offset", "timetz", "'23:59:59.000001-09:30'", "23:59:59.000001-09:30"),
    Case("timestamp-year-1", "timestamp", "'0001-01-01 00:00:00'", -62135596800000),
    # multidimensional arrays arrive flattened (ADBC reads no dimensions): documented in docs/values.md
    Case("int-2d-array-flattened", "int[][]", "'{{1,2},{3,4}}'", [1, 2, 3, 4]),
]


@pytest.fixture
def pg_conn_id(postgres_database: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """A postgres connection to a fresh database whose sessions run in Asia/Kolkata (+05:30)."""
    from pg_plugin import set_airflow_postgres_conn

    postgres_database.execute(f"ALTER DATABASE \"{postgres_database.dbname}\" SET timezone = 'Asia/Kolkata'")
    return set_airflow_postgres_conn(monkeypatch, postgres_database, "stopchurn_types_pg")


@pytest.fixture
def pg_hook(pg_conn_id: str) -> Any:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    return PostgresHook(postgres_conn_id=pg_conn_id)


def _case_sql(case: Case) -> str:
    return (
        f"SELECT 1 AS id, CAST({case.literal} AS {case.sql_type}) AS v "
        f"UNION ALL SELECT 2, CAST(NULL AS {case.sql_type}) ORDER BY id"
    )


@pytest.mark.parametrize("case", CASES + EXACT_CASES, ids=lambda case: getattr(case, "name", None))
def test_type_fidelity(pg_conn_id: str, case: Case) -> None:
    rows = encoded_rows(read_sql(pg_conn_id, _case_sql(case)), decimal_as_string=case.decimal_as_string)
    assert [row["id"] for row in rows] == [1, 2]
    assert_json_same(rows[0]["v"], case.expected)
    assert rows[1]["v"] is None


def test_the_matrix_is_complete() -> None:
    assert len(CASES) == 45  # the psycopg path's matrix, unchanged


def test_bytea_is_refused_naming_the_column(pg_conn_id: str) -> None:
    with pytest.raises(SourceDataError, match=r"'avatar'.*encode\(avatar, 'base64'\)"):
        canonical(read_sql(pg_conn_id, "SELECT 1 AS id, '\\xdeadbeef'::bytea AS avatar"))


@pytest.mark.parametrize(
    ("sql_type", "literal", "words"),
    [
        ("money", "1.5", ["'v'", "money", "v::numeric"]),
        ("inet", "'10.0.0.1'", ["'v'", "'inet'", "CAST(v AS TEXT)"]),
        ("bytea[]", "ARRAY['\\x00'::bytea]", ["'v'", "binary"]),
    ],
)
def test_types_without_a_json_form_are_refused(pg_conn_id: str, sql_type: str, literal: str, words: list[str]) -> None:
    with pytest.raises(SourceDataError) as caught:
        canonical(read_sql(pg_conn_id, f"SELECT 1 AS id, CAST({literal} AS {sql_type}) AS v"))
    for word in words:
        assert word in str(caught.value)


def test_empty_result_keeps_the_columns_and_their_kinds(pg_conn_id: str) -> None:
    canon = canonical(read_sql(pg_conn_id, "SELECT 1::bigint AS id, 'x'::text AS name, '{}'::jsonb AS doc WHERE false"))
    assert canon.frame.height == 0
    assert canon.frame.columns == ["id", "name", "doc"]
    assert canon.kinds == {"id": "int", "name": "string", "doc": "json"}


def test_parameters_and_statement_lists(pg_conn_id: str) -> None:
    def ids(source: Source) -> list[Any]:
        return canonical(source).frame["id"].to_list()

    assert ids(read_sql(pg_conn_id, "SELECT %(n)s::bigint AS id", {"n": 9007199254740993})) == [9007199254740993]
    assert ids(
        read_sql(
            pg_conn_id,
            ["CREATE TEMP TABLE tmp_ids AS SELECT generate_series(1, 3) AS id", "SELECT id FROM tmp_ids ORDER BY id"],
        )
    ) == [1, 2, 3]
    # one string of several statements, trailing semicolons and comments, a literal %, a text parameter compared
    # with a date (bound untyped, as psycopg binds it), a quote inside a parameter
    script = """
        CREATE TEMP TABLE days AS SELECT d::date AS day, 'it''s 100%%' AS note
            FROM generate_series('2024-01-01'::date, '2024-01-05'::date, '1 day') AS d; -- set up
        SELECT extract(day FROM day)::int AS id, note FROM days
        WHERE day >= %s AND note <> %s ORDER BY id;  -- the source
        /* done */
    """
    canon = canonical(read_sql(pg_conn_id, script, ["2024-01-04", "x'; DROP TABLE days; --"]))
    assert canon.frame.rows() == [(4, "it's 100%"), (5, "it's 100%")]


def test_placeholder_errors_are_clear(pg_conn_id: str) -> None:
    with pytest.raises(SourceDataError, match="no parameter of that name"):
        canonical(read_sql(pg_conn_id, "SELECT %(a)s AS id", {"b": 1}))
    with pytest.raises(SourceDataError, match="more %s placeholders"):
        canonical(read_sql(pg_conn_id, "SELECT %s AS id, %s AS v", [1]))
    with pytest.raises(SourceDataError, match="%% for a percent sign"):
        canonical(read_sql(pg_conn_id, "SELECT 1 AS id WHERE 'a' LIKE '%a'", [1]))


def test_sql_errors(pg_conn_id: str) -> None:
    with pytest.raises(SourceDataError, match="empty"):
        canonical(read_sql(pg_conn_id, " -- nothing\n"))
    with pytest.raises(SourceDataError, match="no result set"):
        canonical(read_sql(pg_conn_id, "CREATE TEMP TABLE t (id int)"))
    with pytest.raises(SourceDataError, match="several columns named 'id'"):
        canonical(read_sql(pg_conn_id, "SELECT 1 AS id, 2 AS id"))


def test_database_errors_propagate(pg_conn_id: str) -> None:
    import adbc_driver_manager

    with pytest.raises(adbc_driver_manager.ProgrammingError, match='relation "no_such_table" does not exist'):
        canonical(read_sql(pg_conn_id, "SELECT * FROM no_such_table"))


def test_statements_are_committed_and_the_connection_released(pg_conn_id: str, postgres_database: Any) -> None:
    postgres_database.execute("CREATE TABLE audit (id int)")
    canonical(read_sql(pg_conn_id, ["INSERT INTO audit VALUES (1)", "SELECT id FROM audit"]))
    with postgres_database.connect() as conn:
        assert conn.execute("SELECT count(*) FROM audit").fetchone() == (1,)
        others = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert others == (0,)


def test_a_source_abandoned_midway_releases_its_connection(pg_conn_id: str, postgres_database: Any) -> None:
    batches = read_sql(pg_conn_id, "SELECT generate_series(1, 300000) AS id")
    next(batches)
    batches.close()
    with postgres_database.connect() as conn:
        others = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert others == (0,)


def test_connection_extras_and_hook_params_reach_the_server(
    postgres_database: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json as _json

    extra = {"application_name": "stopchurn &=+%x", "options": "-c search_path=custom,public", "connect_timeout": 5}
    conn = {**_json.loads(postgres_database.airflow_connection_json()), "schema": "no_such_db", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_STOPCHURN_EXTRAS_PG", _json.dumps(conn))
    postgres_database.execute("CREATE SCHEMA custom", "CREATE TABLE custom.t AS SELECT 7 AS id")
    sql = "SELECT id, current_setting('application_name') AS app FROM t"
    # sql_hook_params={"database": ...} overrides the connection's schema, as PostgresHook does
    canon = canonical(read_sql("stopchurn_extras_pg", sql, hook_params={"database": postgres_database.dbname}))
    assert canon.frame.rows() == [(7, "stopchurn &=+%x")]


def test_plain_get_df_would_lose_integers(pg_hook: Any, pg_conn_id: str) -> None:
    """Why the SQL source does not call get_df (measured on pandas 3.1, common-sql 2.4)."""
    sql = "SELECT 9007199254740993::bigint AS b, '{\"a\": 1}'::jsonb AS j UNION ALL SELECT NULL, NULL"
    plain = pg_hook.get_df(sql, df_type="pandas", coerce_float=False)
    assert plain["b"].dtype == "float64"  # 2**53 + 1 silently became 2**53
    nullable = pg_hook.get_df(sql, df_type="pandas", dtype_backend="numpy_nullable", coerce_float=False)
    assert nullable["j"].iloc[0] == "{'a': 1}"  # a dict's Python repr, not JSON
    exact = encoded_rows(read_sql(pg_conn_id, "SELECT row_number() OVER () AS id, * FROM (" + sql + ") AS q"))
    assert exact[0]["b"] == 9007199254740993
    assert exact[0]["j"] == {"a": 1}


# --- the same table read twice, through a Parquet snapshot -----------------------------------------------------
_TABLE = """
CREATE TABLE fidelity (
    id bigint PRIMARY KEY, i integer, b bigint, s smallint, n numeric, n3 numeric(12, 3), r real,
    d double precision, flag boolean, t text, c char(4), u uuid, day date, at timestamp, at_tz timestamptz,
    tm time, iv interval, j json, jb jsonb, tags text[], nums int[]
)
"""
_ROWS = """
INSERT INTO fidelity VALUES
 (1, 1, 9007199254740993, 1, 12345678901234567890.123456789, 1.100, 0.1, 0.1, true, 'a', 'x',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '2024-01-02 03:04:05.678901',
  '2024-01-02 03:04:05.678901+02', '13:45:30.5', '1 day 2 hours', '{"b": 1, "a": 0.1}', '{"z": [1, 2], "y": null}',
  '{a,b}', '{1,NULL}'),
 (2, NULL, NULL, NULL, NULL, NULL, 'NaN', 'Infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL),
 (3, -5, -9223372036854775808, -32768, -0.5, 0, 3.0, 3.0, false, '', '    ', NULL, '1969-07-20', '1969-07-20 20:17:40',
  '1969-07-20 20:17:40+00', '00:00:00', '-3 seconds', '[1, "two", {"three": 3}]', '{"a": {"c": 1, "b": 2}}',
  '{}', '{}')
"""


def test_unchanged_table_round_trips_through_parquet_without_changes(
    postgres_database: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pg_plugin import set_airflow_postgres_conn

    db = postgres_database
    db.execute(_TABLE, _ROWS)
    conn_id = set_airflow_postgres_conn(monkeypatch, db, "stopchurn_roundtrip_pg")

    db.execute(f"ALTER DATABASE \"{db.dbname}\" SET timezone = 'Asia/Kolkata'")
    first = canonical(read_sql(conn_id, "SELECT * FROM fidelity ORDER BY id"))
    snapshot = tmp_path / "snapshot.parquet"
    first.frame.write_parquet(snapshot)
    stored = pl.read_parquet(snapshot)
    assert stored.schema == first.frame.schema
    assert stored.equals(first.frame)

    # Same data, seen from another session time zone, in another row order, with json keys in another order.
    db.execute(
        f"ALTER DATABASE \"{db.dbname}\" SET timezone = 'America/Los_Angeles'",
        """UPDATE fidelity SET j = '{"a": 0.1, "b": 1}' WHERE id = 1""",
    )
    second = canonical(read_sql(conn_id, "SELECT * FROM fidelity ORDER BY id DESC"))
    assert second.kinds == first.kinds
    changes = diff_frames(stored, second.frame, ["id"])
    assert changes.inserted.height == 0
    assert changes.updated.height == 0, changes.updated
    assert changes.deleted.height == 0
    assert changes.unchanged == 3

    # And a real change is seen: one float ulp, one json value.
    db.execute(
        "UPDATE fidelity SET d = 0.1 + 1e-16 WHERE id = 1",
        """UPDATE fidelity SET jb = '{"a": {"c": 1, "b": 3}}' WHERE id = 3""",
    )
    third = canonical(read_sql(conn_id, "SELECT * FROM fidelity"))
    changes = diff_frames(stored, third.frame, ["id"])
    assert sorted(changes.updated["id"].to_list()) == [1, 3]
    assert changes.unchanged == 1


def test_round_trip_values_are_what_the_database_holds(pg_hook: Any, pg_conn_id: str) -> None:
    """Spot checks of the canonical values behind the round trip (NaN/inf -> null, integral floats)."""
    pg_hook.run([_TABLE, _ROWS])
    rows = {row["id"]: row for row in encoded_rows(read_sql(pg_conn_id, "SELECT * FROM fidelity"))}
    assert_json_same(rows[1]["b"], 9007199254740993)
    assert_json_same(rows[1]["n"], Decimal("12345678901234567890.123456789"))
    assert_json_same(rows[1]["at_tz"], ms(dt.datetime(2024, 1, 2, 1, 4, 5, 678000, tzinfo=UTC)))
    assert_json_same(rows[1]["j"], {"a": Decimal("0.1"), "b": 1})
    assert rows[2]["r"] is None and rows[2]["d"] is None and rows[2]["i"] is None
    assert_json_same(rows[3]["b"], -9223372036854775808)
    assert_json_same(rows[3]["at"], ms(dt.datetime(1969, 7, 20, 20, 17, 40)))
    assert_json_same(rows[3]["tags"], [])
    assert math.isclose(float(rows[1]["r"]), 0.1, rel_tol=1e-7)
