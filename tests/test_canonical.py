"""Sources beyond pandas: polars, Arrow, batch streams -> the same canonical frame, and the same JSON sent.

The pandas path (``encoding.canonicalize``) is the reference: each input kind holding the same values must give
the same kinds, the same canonical frame and the same encoded rows; the engine must send the same updates. Then
the Arrow types a DataFrame does not hold (ADBC's json/uuid/numeric/interval/timetz, times, durations), batches
that type a column differently, key checks across batches, and what is refused.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from helpers_sync import T0, RecordingSender, make_client, options
from hypothesis import given
from hypothesis import strategies as st

from airflow_provider_stopchurn.encode.records import encode_rows
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.source.canonical import canonicalize_arrow, canonicalize_source, convert_arrow_column
from airflow_provider_stopchurn.source.frame import canonicalize
from airflow_provider_stopchurn.source.values import (
    _decimal_canonical,
    _decimal_canonical_general,
    _decimal_text,
    _decimal_text_of,
)
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

UTC = dt.UTC
N = 7


# --- one table, every way it can arrive ------------------------------------------------------------------------
def _columns() -> dict[str, list[Any]]:
    return {
        "id": list(range(1, N + 1)),
        "big": [2**53 + 1, None, -(2**63), 0, 5, None, 7],
        "score": [0.1, None, float("nan"), 3.0, -1.5, 1e300, float("inf")],
        "name": ["a", None, 'é "q" \\', "", "東京", "x", "y"],
        "flag": [True, False, None, True, True, False, False],
        "at": [dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), None]
        + [dt.datetime(1969, 12, 31, 23, 59, 59, 999500, tzinfo=UTC)] * 5,
        "day": [dt.date(2024, 2, 29), None, dt.date(1969, 12, 31), dt.date(1970, 1, 1), None, None, None],
        "amount": [Decimal("1.5000"), None, Decimal("-0.0001"), Decimal("12345678.9"), Decimal(0), None, None],
        "meta": [{"tier": "gold", "n": 1}, None, {"tier": None, "n": 2}, {"tier": "x", "n": None}, None, None, None],
        "tags": [[1, 2], None, [], [3], None, [None], [4, 5, 6]],
        "note": [None] * N,
    }


def pandas_frame() -> pd.DataFrame:
    c = _columns()
    return pd.DataFrame(
        {
            "id": pd.array(c["id"], dtype="Int64"),
            "big": pd.array(c["big"], dtype="Int64"),
            "score": pd.array(c["score"], dtype="float64"),
            "name": pd.array(c["name"], dtype="string"),
            "flag": pd.array(c["flag"], dtype="boolean"),
            "at": pd.to_datetime(pd.Series(c["at"], dtype=object), utc=True),
            "day": pd.Series(c["day"], dtype=object),
            "amount": pd.Series(c["amount"], dtype=object),
            "meta": pd.Series(c["meta"], dtype=object),
            "tags": pd.Series(c["tags"], dtype=object),
            "note": pd.Series(c["note"], dtype=object),
        }
    )


def arrow_table() -> pa.Table:
    c = _columns()
    return pa.table(
        {
            "id": pa.array(c["id"], pa.int64()),
            "big": pa.array(c["big"], pa.int64()),
            "score": pa.array(c["score"], pa.float64()),
            "name": pa.array(c["name"], pa.string()),
            "flag": pa.array(c["flag"], pa.bool_()),
            "at": pa.array(c["at"], pa.timestamp("us", tz="UTC")),
            "day": pa.array(c["day"], pa.date32()),
            "amount": pa.array(c["amount"], pa.decimal128(20, 4)),
            "meta": pa.array(c["meta"], pa.struct([("tier", pa.string()), ("n", pa.int64())])),
            "tags": pa.array(c["tags"], pa.list_(pa.int64())),
            "note": pa.nulls(N),
        }
    )


#: Each input kind, made from an Arrow table holding the values.
AS_KIND: dict[str, Callable[[pa.Table], Any]] = {
    "arrow-table": lambda table: table,
    "arrow-record-batch": lambda table: table.combine_chunks().to_batches()[0],
    "arrow-reader": lambda table: pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=3)),
    "batch-iterator": lambda table: iter(table.to_batches(max_chunksize=3)),
    "batch-list": lambda table: table.to_batches(max_chunksize=2),
    "polars": lambda table: pl.from_arrow(table),
    "polars-lazy": lambda table: pl.from_arrow(table).lazy().select(pl.all()),  # type: ignore[union-attr]
}
SOURCES: dict[str, Callable[[], Any]] = {
    kind: (lambda make=make: make(arrow_table()))
    for kind, make in AS_KIND.items()  # type: ignore[misc]
}


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("decimal_as_string", [False, True])
def test_every_input_kind_gives_the_pandas_canonical_frame(kind: str, decimal_as_string: bool) -> None:
    expected = canonicalize(pandas_frame(), key_columns=["id"], decimal_as_string=decimal_as_string)
    for source in (SOURCES[kind](), SOURCES[kind]):  # the data, and a callable returning it
        canon = canonicalize_source(source, key_columns=["id"], decimal_as_string=decimal_as_string)
        assert canon.kinds == expected.kinds
        assert canon.frame.schema == expected.frame.schema
        assert canon.frame.equals(expected.frame)
        rows = encode_rows(canon.frame, canon.kinds, decimal_as_string=decimal_as_string).to_list()
        assert rows == encode_rows(expected.frame, expected.kinds, decimal_as_string=decimal_as_string).to_list()


def test_the_shared_table_sends_what_the_readme_promises() -> None:
    """An independent oracle for the table above (docs/values.md: Values), so that pandas and Arrow cannot agree on a
    wrong value."""
    canon = canonicalize_source(arrow_table(), key_columns=["id"])
    rows = [json.loads(text, parse_float=Decimal) for text in encode_rows(canon.frame, canon.kinds).to_list()]
    assert rows[0] == {
        "id": 1,
        "big": 2**53 + 1,
        "score": Decimal("0.1"),
        "name": "a",
        "flag": True,
        "at": 1704164645678,
        "day": 1709164800000,
        "amount": Decimal("1.5"),
        "meta": {"n": 1, "tier": "gold"},
        "tags": [1, 2],
        "note": None,
    }
    assert rows[2]["score"] is None and rows[6]["score"] is None  # NaN, inf
    assert rows[2]["at"] == -1 and rows[2]["day"] == -86_400_000 and rows[2]["amount"] == Decimal("-0.0001")
    assert rows[3]["score"] == 3 and type(rows[3]["score"]) is int  # an integral float is written as an integer
    assert rows[5]["tags"] == [None]


# --- the engine sends the same updates -------------------------------------------------------------------------
def _sent(first: Any, second: Any, sandbox: SandboxServer, root: Path) -> list[dict[str, Any]]:
    sender = RecordingSender(make_client(sandbox))
    store = SnapshotStore(root, 7, "subscription")
    run_sync(first, store, sender, options(chunk_size=3), run_ms=T0)
    run_sync(second, store, sender, options(chunk_size=3), run_ms=T0 + 1)
    return sender.updates()


@pytest.mark.parametrize("kind", AS_KIND)
def test_the_engine_sends_the_same_json_as_for_the_pandas_frame(
    kind: str, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A first load, then a run that updates row 2 and deletes row 1: the same updates, byte for byte."""
    names = ["a", "B", *_columns()["name"][2:]]
    changed_pandas = pandas_frame().assign(name=pd.array(names, dtype="string")).iloc[1:]
    changed = arrow_table().set_column(3, "name", pa.array(names)).slice(1)
    reference = _sent(pandas_frame(), changed_pandas, stopchurn_sandbox_factory(), tmp_path / "pandas")
    make = AS_KIND[kind]
    sent = _sent(make(arrow_table()), make(changed), stopchurn_sandbox_factory(), tmp_path / kind)
    assert [u["type"] for u in sent] == ["insert"] * N + ["delete", "update"]
    assert sent == reference


# --- batches that type a column differently -------------------------------------------------------------------
def _stream(*columns: pa.Array) -> Iterator[pa.RecordBatch]:
    start = 0
    for column in columns:
        ids = pa.array(range(start, start + len(column)), pa.int64())
        start += len(column)
        yield pa.RecordBatch.from_arrays([ids, column], names=["id", "v"])


@pytest.mark.parametrize(
    ("columns", "kind", "pandas_values"),
    [
        ((pa.nulls(2), pa.array([1, None], pa.int64())), "int", pd.array([None, None, 1, None], dtype="Int64")),
        ((pa.array([1, 2]), pa.array([2.5, None])), "float", pd.Series([1, 2, 2.5, None], dtype=object)),
        ((pa.array([1, 2]), pa.array(["x", None])), "json", pd.Series([1, 2, "x", None], dtype=object)),
        ((pa.array([True]), pa.array([1])), "json", pd.Series([True, 1], dtype=object)),
        ((pa.array([1.5]), pa.array([{"a": 1}])), "json", pd.Series([1.5, {"a": 1}], dtype=object)),
        (
            (
                pa.ExtensionArray.from_storage(pa.opaque(pa.string(), "numeric", "PostgreSQL"), pa.array(["2.50"])),
                pa.array([7]),
            ),
            "json",
            pd.Series([Decimal("2.50"), 7], dtype=object),
        ),
        ((pa.array(["a"]), pa.nulls(1), pa.array(["b"])), "string", pd.Series(["a", None, "b"], dtype=object)),
    ],
)
def test_batch_kinds_are_joined_as_over_the_whole_column(
    columns: tuple[pa.Array, ...], kind: str, pandas_values: Any
) -> None:
    canon = canonicalize_arrow(_stream(*columns), key_columns=["id"])
    expected = canonicalize(pd.DataFrame({"id": range(len(pandas_values)), "v": pandas_values}), key_columns=["id"])
    assert canon.kinds["v"] == expected.kinds["v"] == kind
    assert canon.frame.equals(expected.frame)


def test_key_checks_span_the_batches() -> None:
    keys = (pa.array([1, 2]), pa.array([3, 1]))
    batches = [pa.RecordBatch.from_arrays([k], names=["id"]) for k in keys]
    with pytest.raises(SourceDataError, match=r"Duplicate key value\(s\) in 'id': 1;"):
        canonicalize_arrow(batches, key_columns=["id"])
    batches = [pa.RecordBatch.from_arrays([pa.array([1.0, 2.0])], names=["id"])] * 2 + [
        pa.RecordBatch.from_arrays([pa.array([3.0, float("nan")])], names=["id"])
    ]
    with pytest.raises(SourceDataError, match=r"Key column 'id' has 1 missing value\(s\) .* at row\(s\) 5;"):
        canonicalize_arrow(batches, key_columns=["id"])
    mixed = [
        pa.RecordBatch.from_arrays([pa.array([1])], names=["id"]),
        pa.RecordBatch.from_arrays([pa.array(["2"])], names=["id"]),
    ]
    with pytest.raises(SourceDataError, match="mixes value types"):
        canonicalize_arrow(mixed, key_columns=["id"])
    other = [
        pa.RecordBatch.from_arrays([pa.array([1])], names=["id"]),
        pa.RecordBatch.from_arrays([pa.array([2])], names=["key"]),
    ]
    with pytest.raises(SourceDataError, match="different columns"):
        canonicalize_arrow(other, key_columns=["id"])


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ([1.0, float("inf")], ["'id'", "infinite", "row(s) 1"]),
        ([1.0, 2.5], ["'id'", "2.5", "whole numbers"]),
        ([1, None], ["'id'", "missing", "row(s) 1"]),
    ],
)
def test_float_and_missing_keys_are_refused_as_in_pandas(values: list[Any], words: list[str]) -> None:
    with pytest.raises(SourceDataError) as from_arrow:
        canonicalize_arrow(pa.table({"id": values}), key_columns=["id"])
    with pytest.raises(SourceDataError) as from_pandas:
        canonicalize(pd.DataFrame({"id": values}), key_columns=["id"])
    assert str(from_arrow.value) == str(from_pandas.value)
    for word in words:
        assert word in str(from_arrow.value)


def test_composite_keys_and_ids_as_in_pandas() -> None:
    table = pa.table({"region": ["eu", "x:y", "a\\"], "n": [1, 2, 3], "v": [True, False, None]})
    canon = canonicalize_source(table, key_columns=["region", "n"])
    assert canon.frame["id"].to_list() == ["eu:1", "x\\:y:2", "a\\\\:3"]
    assert canon.frame.equals(canonicalize(table.to_pandas(), key_columns=["region", "n"]).frame)
    with pytest.raises(SourceDataError, match="'id' has duplicate value"):
        canonicalize_source(pa.table({"k": [1, 2], "id": [5, 5]}), key_columns=["k"])


def test_an_empty_source_keeps_its_columns() -> None:
    schema = pa.schema([("id", pa.int64()), ("name", pa.string())])
    for source in (schema.empty_table(), pa.RecordBatchReader.from_batches(schema, iter([]))):
        canon = canonicalize_source(source, key_columns=["id"])
        assert canon.frame.columns == ["id", "name"] and canon.frame.height == 0
        assert canon.kinds == {"id": "int", "name": "string"}
    with pytest.raises(SourceDataError, match=r"Key column\(s\) 'id' not found; available columns: \(none\)"):
        canonicalize_source(iter([]), key_columns=["id"])


# --- Arrow types a DataFrame does not hold ---------------------------------------------------------------------
def _one(column: pa.Array, field: pa.Field | None = None) -> tuple[list[Any], str]:
    series, kind = convert_arrow_column("v", column, field=field)
    return series.to_list(), kind


def test_times_durations_and_intervals_as_iso_text() -> None:
    assert _one(pa.array([0, 49530, None], pa.time32("s"))) == (["00:00:00", "13:45:30", None], "string")
    assert _one(pa.array([49530500, None], pa.time32("ms")))[0] == ["13:45:30.500000", None]
    assert _one(pa.array([49530123456789, 1000], pa.time64("ns")))[0] == ["13:45:30.123456789", "00:00:00.000001"]
    assert _one(pa.array([90061_500_000_000, -1_000_000_000, 0, None], pa.duration("ns"))) == (
        ["P1DT1H1M1.5S", "-PT1S", "PT0S", None],
        "string",
    )
    intervals = pa.array(
        [
            pa.MonthDayNano([0, 1, 3_600 * 10**9]),
            pa.MonthDayNano([14, 3, 0]),
            pa.MonthDayNano([-1, 0, 0]),
            pa.MonthDayNano([-13, -1, -(10**9)]),
            pa.MonthDayNano([1, -1, 0]),
            pa.MonthDayNano([-2, 0, 5 * 10**8]),
            pa.MonthDayNano([0, 0, 0]),
            pa.MonthDayNano([0, 2**31 - 1, 0]),
            None,
        ],
        pa.month_day_nano_interval(),
    )
    assert _one(intervals) == (
        ["P1DT1H", "P1Y2M3D", "-P1M", "-P1Y1M1DT1S", "P1M-1D", "P-2MT0.5S", "PT0S", "P2147483647D", None],
        "string",
    )
    assert _one(intervals.slice(1, 2))[0] == ["P1Y2M3D", "-P1M"]  # a slice reads its own values


def test_uuid_numeric_and_timetz_extensions() -> None:
    ids = [uuid.UUID("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"), None, uuid.UUID(int=1)]
    storage = pa.array([u.bytes if u else None for u in ids], pa.binary(16))
    assert _one(pa.ExtensionArray.from_storage(pa.uuid(), storage)) == (
        ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", None, "00000000-0000-0000-0000-000000000001"],
        "string",
    )
    numeric = pa.ExtensionArray.from_storage(
        pa.opaque(pa.string(), "numeric", "PostgreSQL"), pa.array(["1.500", "nan", "-Infinity", None, "1E+3"])
    )
    assert _one(numeric) == (["1.5", None, None, None, "1000"], "decimal")
    assert convert_arrow_column("v", numeric, decimal_as_string=True)[1] == "string"
    # PostgreSQL's binary timetz: int64 microseconds, int32 seconds west of UTC, big-endian
    raw = [
        (49530_500_000).to_bytes(8, "big") + (-7200).to_bytes(4, "big", signed=True),
        None,
        (25500_000_000).to_bytes(8, "big") + (34200 + 15).to_bytes(4, "big", signed=True),
    ]
    timetz = pa.ExtensionArray.from_storage(pa.opaque(pa.binary(), "timetz", "PostgreSQL"), pa.array(raw, pa.binary()))
    assert _one(timetz) == (["13:45:30.500000+02:00", None, "07:05:00-09:30:15"], "string")


def _json(texts: list[str | None]) -> pa.Array:
    return pa.ExtensionArray.from_storage(pa.json_(), pa.array(texts, pa.string()))


def test_json_text_is_canonical_and_exact() -> None:
    texts = [
        '{"b": 1, "a": [1, 2.5, null]}',
        None,
        '{"x": 12345678901234567890.123456789, "y": 1.0, "z": 1e-7, "w": 1E2}',
        '"gold"',
        "18446744073709551615",
        '{"a": 1, "a": 2}',
        "1e400",
        "[-9223372036854775809]",
    ]
    series, kind = convert_arrow_column("v", _json(texts[:6]))
    assert kind == "json"
    assert series.to_list() == [
        '{"a":[1,2.5,null],"b":1}',
        None,
        '{"w":100.0,"x":12345678901234567890.123456789,"y":1.0,"z":1e-7}',  # floats where exact, as psycopg read
        '"gold"',
        "18446744073709551615",
        '{"a":2}',
    ]
    with pytest.raises(SourceDataError, match=r"'v'.*JSON number cannot carry"):
        convert_arrow_column("v", _json(texts[6:7]))
    with pytest.raises(SourceDataError, match=r"'v'.*cannot be written as JSON.*64-bit"):  # read exactly, not sendable
        convert_arrow_column("v", _json(texts[7:]))
    with pytest.raises(SourceDataError, match="not one JSON value"):
        convert_arrow_column("v", _json(['{"a": 1}', "1, 2"]))


def test_containers_with_extension_values() -> None:
    numeric = pa.opaque(pa.string(), "numeric", "PostgreSQL")
    decimals = pa.ExtensionArray.from_storage(numeric, pa.array(["1.50", None, "2", "3.0"]))
    column = pa.ListArray.from_arrays(pa.array([0, 3, 3], pa.int32()), decimals, mask=pa.array([False, True]))
    assert _one(column) == (["[1.5,null,2]", None], "json")
    docs = pa.ExtensionArray.from_storage(pa.json_(), pa.array(['{"b": 2, "a": 0.1}']))
    assert _one(pa.LargeListArray.from_arrays(pa.array([0, 1], pa.int64()), docs))[0] == ['[{"a":0.1,"b":2}]']
    ids = pa.ExtensionArray.from_storage(pa.uuid(), pa.array([uuid.UUID(int=2).bytes], pa.binary(16)))
    struct = pa.StructArray.from_arrays([ids, decimals.slice(3)], names=["u", "n"])
    assert _one(struct)[0] == ['{"n":3,"u":"00000000-0000-0000-0000-000000000002"}']


def test_postgres_float4_and_money_from_the_field_metadata() -> None:
    real = pa.field("v", pa.float32(), metadata={b"POSTGRESQL:type": b"float4"})
    assert _one(pa.array([0.1, None, 3.4028235e38], pa.float32()), real)[0] == [0.1, None, 3.4028235e38]
    assert _one(pa.array([0.1], pa.float32()))[0] == [float(np.float32(0.1))]  # a plain float32: widened, as pandas
    money = pa.field("v", pa.int64(), metadata={b"POSTGRESQL:type": b"money"})
    with pytest.raises(SourceDataError, match="money"):
        convert_arrow_column("v", pa.array([150]), field=money)


def test_dictionary_columns_as_their_values() -> None:
    column = pa.array(["b", "a", None, "b"]).dictionary_encode()
    assert _one(column) == (["b", "a", None, "b"], "string")
    frame = pd.DataFrame({"id": [1, 2, 3, 4], "v": pd.Categorical(["b", "a", None, "b"])})
    table = pa.table({"id": [1, 2, 3, 4], "v": column})
    assert canonicalize_arrow(table, key_columns=["id"]).frame.equals(canonicalize(frame, key_columns=["id"]).frame)


@pytest.mark.parametrize(
    ("column", "words"),
    [
        (pa.array([b"\x00"], pa.binary()), ["'v'", "binary"]),
        (pa.array([b"\x00"], pa.large_binary()), ["'v'", "binary"]),
        (pa.array([[b"\x00"]], pa.list_(pa.binary())), ["'v'", "binary"]),
        (
            pa.ExtensionArray.from_storage(pa.opaque(pa.binary(), "inet", "PostgreSQL"), pa.array([b"\x00"])),
            ["'v'", "PostgreSQL type 'inet'", "CAST(v AS TEXT)"],
        ),
        (pa.array([2**64 - 1], pa.uint64()), ["'v'", "64-bit"]),
        (pa.array([{1: "a"}], pa.map_(pa.int64(), pa.string())), []),
    ],
)
def test_what_cannot_be_sent_is_refused(column: pa.Array, words: list[str]) -> None:
    if not words:  # a map with int keys is fine (keys as text); one with a repeated key is not
        assert _one(column)[0] == ['{"1":"a"}']
        repeated = pa.MapArray.from_arrays([0, 2], pa.array([1, 1]), pa.array(["a", "b"]))
        with pytest.raises(SourceDataError, match="repeated key"):
            convert_arrow_column("v", repeated)
        return
    with pytest.raises(SourceDataError) as caught:
        convert_arrow_column("v", column)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    ("source", "words"),
    [
        (lambda: [{"id": 1}], ["pandas DataFrame", "got list"]),
        (lambda: iter([{"id": 1}]), ["pandas DataFrame", "iterator yielding dict"]),
        (lambda: "SELECT 1", ["got str"]),
        (
            lambda: pl.DataFrame({"id": [1], "o": [object()]}, schema={"id": pl.Int64, "o": pl.Object}),
            ["polars", "'o'", "Object"],
        ),
    ],
)
def test_sources_that_are_not_tables_are_refused(source: Callable[[], Any], words: list[str]) -> None:
    with pytest.raises(SourceDataError) as caught:
        canonicalize_source(source, key_columns=["id"])
    for word in words:
        assert word in str(caught.value)


def test_a_reader_or_generator_is_closed_after_reading() -> None:
    closed: list[bool] = []

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield pa.RecordBatch.from_arrays([pa.array([1, 1])], names=["id"])
            yield pa.RecordBatch.from_arrays([pa.array([2])], names=["id"])
        finally:
            closed.append(True)

    with pytest.raises(SourceDataError, match="Duplicate"):
        canonicalize_source(batches(), key_columns=["id"])
    assert closed == [True]


# --- decimals inside JSON values: one rule, two implementations ------------------------------------------------
@given(
    st.decimals(allow_nan=False, allow_infinity=False)
    | st.builds(lambda d, e: Decimal(d).scaleb(e), st.integers(-(10**30), 10**30), st.integers(-90, 90))
)
def test_scalar_decimal_text_matches_the_vectorised_one(value: Decimal) -> None:
    assert _decimal_text_of(value) == _decimal_text(pl.Series([str(value)])).item()


_DECIMAL_TEXTS = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.from_regex(r"\A[+-]?[0-9]{0,70}(\.[0-9]{0,70})?([eE][+-]?[0-9]{1,3})?\Z"),
    st.from_regex(r"\A-?(0|[1-9][0-9]{0,62})(\.[0-9]{1,62})?\Z"),
    st.text(alphabet="0123456789.-+eE\u0660\uff11", max_size=8),  # not decimals, or digits of other scripts
)


@given(st.lists(st.none() | _DECIMAL_TEXTS, max_size=20))
def test_the_fast_decimal_rule_matches_the_general_one(texts: list[str | None]) -> None:
    series = pl.Series(texts, dtype=pl.String)
    assert _decimal_canonical(series).equals(_decimal_canonical_general(series))


def test_decimals_inside_json_values_keep_their_digits() -> None:
    values = [{"a": Decimal("1.50"), "b": [Decimal("1E-70"), Decimal("-0.000")]}]
    canon = canonicalize(pd.DataFrame({"id": [1], "v": values}), key_columns=["id"])
    assert orjson.loads(canon.frame["v"][0]) == {"a": 1.5, "b": [1e-70, 0]}
    assert canon.frame["v"][0] == '{"a":1.5,"b":[1E-70,0]}'
