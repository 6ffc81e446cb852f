"""Canonical frames, JSON rows, update envelopes and chunk planning."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import uuid
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_stopchurn.encode.chunks import chunk_bodies, chunk_body, plan_chunks
from airflow_provider_stopchurn.encode.records import encode_rows, encode_updates
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.frame import KINDS, canonicalize

D = decimal.Decimal
UTC = dt.UTC
JAN1 = 1577836800000  # 2020-01-01T00:00:00Z in ms


def rows_of(df: pd.DataFrame, **kwargs: Any) -> list[dict[str, Any]]:
    canon = canonicalize(df, key_columns=["k"], **kwargs)
    assert set(canon.kinds) == set(canon.frame.columns)
    assert all(kind in KINDS for kind in canon.kinds.values())
    encoded = encode_rows(canon.frame, canon.kinds, **kwargs)
    return [json.loads(text) for text in encoded]


def values_of(column: pd.Series | list[Any], parse_float: Any = float, **kwargs: Any) -> tuple[str, list[Any]]:
    df = pd.DataFrame({"k": range(len(column))})
    df["v"] = column.to_numpy() if isinstance(column, pd.Series) else pd.Series(column, dtype=object)
    if isinstance(column, pd.Series):
        df["v"] = column.reset_index(drop=True)
    canon = canonicalize(df, key_columns=["k"], **kwargs)
    texts = encode_rows(canon.frame, canon.kinds, **kwargs)
    rows = [json.loads(t, parse_float=parse_float) for t in texts]
    return canon.kinds["v"], [r["v"] for r in rows]


# --- type matrix ---------------------------------------------------------------------------------------------
TYPE_CASES: list[tuple[str, pd.Series | list[Any], str, list[Any]]] = [
    ("int64", pd.Series([1, -2, 3], dtype="int64"), "int", [1, -2, 3]),
    ("nullable Int64", pd.Series([1, None, 3], dtype="Int64"), "int", [1, None, 3]),
    ("int with NULLs as float", pd.Series([3, None, 5]), "float", [3, None, 5]),
    ("bigint 2^60 exact", pd.Series([2**60 + 1, -(2**60) - 1], dtype="int64"), "int", [2**60 + 1, -(2**60) - 1]),
    ("object bigint exact", [2**60 + 1, None], "int", [2**60 + 1, None]),
    ("uint32", pd.Series([1, 4_000_000_000], dtype="uint32"), "int", [1, 4_000_000_000]),
    ("float NaN/inf -> null", [1.5, float("nan"), float("inf"), float("-inf")], "float", [1.5, None, None, None]),
    ("float64 dtype", pd.Series([0.1, np.nan, -np.inf, 1e300, 2.0]), "float", [0.1, None, None, 1e300, 2]),
    ("float integral large", pd.Series([2.0**53, 2.0**62, 1e20]), "float", [2**53, 2**62, 1e20]),
    ("Float64 masked", pd.Series([1.25, None], dtype="Float64"), "float", [1.25, None]),
    ("bool", pd.Series([True, False]), "bool", [True, False]),
    ("boolean nullable", pd.Series([True, None, False], dtype="boolean"), "bool", [True, None, False]),
    ("object bool", [True, None, False], "bool", [True, None, False]),
    (
        "strings",
        ['say "hi"', "back\\slash", "ctl\x00\x01\x1f\t\n", "ünï©ødé 😀", "\u2028", "  pad  ", None],
        "string",
        ['say "hi"', "back\\slash", "ctl\x00\x01\x1f\t\n", "ünï©ødé 😀", "\u2028", "  pad  ", None],
    ),
    ("str dtype", pd.Series(["a", None, ""], dtype="string"), "string", ["a", None, ""]),
    (
        "uuid",
        [uuid.UUID(int=1), None],
        "string",
        ["00000000-0000-0000-0000-000000000001", None],
    ),
    ("date", [dt.date(2020, 1, 1), dt.date(1969, 12, 31), None], "date", [JAN1, -86_400_000, None]),
    (
        "naive datetime objects",
        [dt.datetime(2020, 1, 1, 0, 0, 0, 1500), None],
        "timestamp",
        [JAN1 + 1, None],
    ),
    (
        "aware datetime objects",
        [dt.datetime(2020, 1, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=2))), None],
        "timestamp",
        [JAN1, None],
    ),
    ("datetime64 ns naive", pd.Series(pd.to_datetime(["2020-01-01", None])), "timestamp", [JAN1, None]),
    (
        "datetime64 s unit",
        pd.Series(pd.to_datetime(["2020-01-01"])).astype("datetime64[s]"),
        "timestamp",
        [JAN1],
    ),
    (
        "datetime64 tz-aware",
        pd.Series(pd.to_datetime(["2019-12-31 19:00"]).tz_localize("America/New_York")),
        "timestamp",
        [JAN1],
    ),
    ("pre-epoch floors", pd.Series(pd.to_datetime(["1969-12-31 23:59:59.9995"])), "timestamp", [-1]),
    ("time", [dt.time(1, 2, 3), dt.time(23, 59, 59, 5), None], "string", ["01:02:03", "23:59:59.000005", None]),
    ("time with offset", [dt.time(1, tzinfo=dt.timezone(dt.timedelta(hours=2)))], "string", ["01:00:00+02:00"]),
    ("categorical", pd.Series(["a", None, "a"], dtype="category"), "string", ["a", None, "a"]),
    (
        "timedelta objects",
        [dt.timedelta(days=1, hours=2, minutes=3, seconds=4.5), dt.timedelta(0), dt.timedelta(seconds=-1), None],
        "string",
        ["P1DT2H3M4.5S", "PT0S", "-PT1S", None],
    ),
    (
        "timedelta64",
        pd.Series(pd.to_timedelta(["1 day", None, "90min", "1ns"])),
        "string",
        ["P1D", None, "PT1H30M", "PT0.000000001S"],
    ),
    (
        "pd.Timedelta objects",
        [pd.Timedelta(days=2, seconds=5), None],
        "string",
        ["P2DT5S", None],
    ),
    (
        "decimal",  # NaN and Infinity are refused as numbers (tests/test_ids_and_values.py)
        [D("1.50"), D("1E+3"), D("-0.00"), D("0.000001200"), None],
        "decimal",
        [D("1.5"), 1000, 0, D("0.0000012"), None],
    ),
    (
        "decimal beyond float precision",
        [D("12345678901234567890.123456789012345678")],
        "decimal",
        [D("12345678901234567890.123456789012345678")],
    ),
    (
        "nested dict/list",
        [{"b": 1, "a": [1, {"y": 2, "x": None}]}, [1, "x", None], (1, 2), None],
        "json",
        [{"a": [1, {"x": None, "y": 2}], "b": 1}, [1, "x", None], [1, 2], None],
    ),
    (
        "nested datetimes/decimals/uuids",
        [{"when": dt.datetime(2020, 1, 1), "day": dt.date(2020, 1, 1), "amount": D("2.50"), "u": uuid.UUID(int=0)}],
        "json",
        [{"when": JAN1, "day": JAN1, "amount": D("2.5"), "u": "00000000-0000-0000-0000-000000000000"}],
    ),
    ("mixed json scalars", [1, "1", 2.5, None], "json", [1, "1", 2.5, None]),
    ("all None", [None, None], "null", [None, None]),
    ("all None with NaN", [None, float("nan")], "null", [None, None]),
]


@pytest.mark.parametrize(
    ("column", "kind", "expected"),
    [pytest.param(c, k, e, id=name) for name, c, k, e in TYPE_CASES],
)
def test_type_matrix(column: pd.Series | list[Any], kind: str, expected: list[Any]) -> None:
    got_kind, got = values_of(column, parse_float=D if "Decimal" in repr(expected) else float)
    assert got_kind == kind
    assert got == expected
    for g, e in zip(got, expected, strict=True):
        assert type(g) is type(e)  # 3 stays an int, never 3.0


def rows_text(column: list[Any] | pd.Series) -> list[str]:
    df = pd.DataFrame({"k": range(len(column))})
    df["v"] = column if isinstance(column, pd.Series) else pd.Series(column, dtype=object)
    canon = canonicalize(df, key_columns=["k"])
    return encode_rows(canon.frame.select("v"), canon.kinds).to_list()


def test_int_with_nulls_encodes_integers_not_floats() -> None:
    assert rows_text(pd.Series([3, None, -7])) == ['{"v":3}', '{"v":null}', '{"v":-7}']


def test_decimal_is_raw_number_or_string() -> None:
    assert rows_text([D("1.50")]) == ['{"v":1.5}']
    df = pd.DataFrame({"k": [1], "v": pd.Series([D("1.50")], dtype=object)})
    canon = canonicalize(df, key_columns=["k"], decimal_as_string=True)
    assert canon.kinds["v"] == "string"
    assert encode_rows(canon.frame.select("v"), canon.kinds, decimal_as_string=True).to_list() == ['{"v":"1.5"}']
    plain = canonicalize(df, key_columns=["k"])
    assert encode_rows(plain.frame.select("v"), plain.kinds, decimal_as_string=True).to_list() == ['{"v":"1.5"}']


def test_equal_values_have_equal_canonical_form() -> None:
    a = pd.DataFrame({"k": [1], "d": pd.Series([D("1.50")], dtype=object), "j": [{"a": 1, "b": 2}]})
    b = pd.DataFrame({"k": [1], "d": pd.Series([D("1.5")], dtype=object), "j": [{"b": 2, "a": 1}]})
    ca, cb = canonicalize(a, key_columns=["k"]), canonicalize(b, key_columns=["k"])
    assert ca.frame.equals(cb.frame)
    naive = pd.DataFrame({"k": [1], "t": pd.to_datetime(["2020-01-01 00:00"])})
    aware = pd.DataFrame({"k": [1], "t": pd.to_datetime(["2020-01-01 09:00"]).tz_localize("Asia/Tokyo")})
    assert canonicalize(naive, key_columns=["k"]).frame.equals(canonicalize(aware, key_columns=["k"]).frame)


def test_canonical_dtypes() -> None:
    df = pd.DataFrame(
        {
            "k": [1],
            "f": [1.5],
            "b": [True],
            "s": ["x"],
            "t": pd.to_datetime(["2020-01-01"]),
            "d": pd.Series([D(1)], dtype=object),
            "j": [{"a": 1}],
            "n": pd.Series([None], dtype=object),
        }
    )
    canon = canonicalize(df, key_columns=["k"])
    assert canon.frame.schema == pl.Schema(
        {
            "k": pl.Int64,
            "f": pl.Float64,
            "b": pl.Boolean,
            "s": pl.String,
            "t": pl.Int64,
            "d": pl.String,
            "j": pl.String,
            "n": pl.String,
            "id": pl.Int64,
        }
    )
    assert canon.key_columns == ("k",)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        pytest.param([b"\x00\x01", None], r"'v'.*encode\(v, 'base64'\)", id="bytes"),
        pytest.param([bytearray(b"x"), 1], r"'v'.*binary.*CAST\(v AS TEXT\)", id="bytearray"),
        pytest.param([memoryview(b"x")], r"'v'.*binary", id="memoryview"),
        pytest.param([object()], r"'v'.*object", id="arbitrary object"),
        pytest.param([{"a": object()}], r"'v'.*JSON", id="object nested in dict"),
        pytest.param([{"a": b"x"}], r"'v'.*binary", id="bytes nested in dict"),
        pytest.param([2**64, None], r"'v'.*64-bit", id="int beyond int64"),
        pytest.param([1, 2**70, "x"], r"'v'", id="json int beyond 64 bit"),
    ],
)
def test_unsupported_values_raise_naming_the_column(values: list[Any], match: str) -> None:
    df = pd.DataFrame({"k": range(len(values))})
    df["v"] = pd.Series(values, dtype=object)
    with pytest.raises(SourceDataError, match=match):
        canonicalize(df, key_columns=["k"])


def test_uint64_beyond_int64_raises() -> None:
    df = pd.DataFrame({"k": [1], "v": np.array([2**64 - 1], dtype="uint64")})
    with pytest.raises(SourceDataError, match=r"'v'.*64-bit"):
        canonicalize(df, key_columns=["k"])


def test_column_names_must_be_strings() -> None:
    df = pd.DataFrame({"k": [1], 0: [2]})
    with pytest.raises(SourceDataError, match="strings"):
        canonicalize(df, key_columns=["k"])


# --- keys ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("df", "keys", "match"),
    [
        pytest.param(pd.DataFrame({"a": [1]}), ["k"], r"'k' not found; available columns: 'a'", id="missing"),
        pytest.param(pd.DataFrame({"k": pd.Series([1, None], dtype="Int64")}), ["k"], r"missing", id="null"),
        pytest.param(pd.DataFrame({"k": ["a", None]}), ["k"], r"'k'.*missing.*row\(s\) 1", id="None"),
        pytest.param(pd.DataFrame({"k": [1.0, np.nan]}), ["k"], r"missing", id="NaN"),
        pytest.param(pd.DataFrame({"k": [1.0, np.inf]}), ["k"], r"infinite", id="inf"),
        pytest.param(
            pd.DataFrame({"k": pd.Series([1.0, -np.inf], dtype=object)}), ["k"], r"non-finite", id="object inf"
        ),
        pytest.param(pd.DataFrame({"k": [1.0, 1.5]}), ["k"], r"whole numbers", id="fractional float"),
        pytest.param(pd.DataFrame({"k": [1, 2, 1]}), ["k"], r"Duplicate key.*1", id="duplicate"),
        pytest.param(
            pd.DataFrame({"a": [1, 1, 2], "b": ["x", "x", "x"]}),
            ["a", "b"],
            r"Duplicate composite key.*\(1, 'x'\)",
            id="composite duplicate",
        ),
        pytest.param(pd.DataFrame({"k": pd.Series([1, "1"], dtype=object)}), ["k"], r"mixes", id="mixed types"),
        pytest.param(pd.DataFrame({"k": [True, False]}), ["k"], r"integers or strings", id="bool key"),
        pytest.param(pd.DataFrame({"k": [1]}), [], r"At least one", id="no key"),
    ],
)
def test_key_validation(df: pd.DataFrame, keys: list[str], match: str) -> None:
    with pytest.raises(SourceDataError, match=match):
        canonicalize(df, key_columns=keys)


def test_key_errors_list_at_most_five() -> None:
    df = pd.DataFrame({"k": [1, 2, 3, 4, 5, 6, 7] * 2})
    with pytest.raises(SourceDataError) as info:
        canonicalize(df, key_columns=["k"])
    message = str(info.value)
    assert "1, 2, 3, 4, 5" in message
    assert "6, 7" not in message
    assert "2 more" in message
    nulls = pd.DataFrame({"k": [None] * 8, "v": range(8)})
    with pytest.raises(SourceDataError, match=r"row\(s\) 0, 1, 2, 3, 4 \(and 3 more\)"):
        canonicalize(nulls, key_columns=["k"])


def test_float_keys_become_int64() -> None:
    canon = canonicalize(pd.DataFrame({"k": [1.0, 2.0]}), key_columns=["k"])
    assert canon.kinds["k"] == "int"
    assert canon.frame["k"].dtype == pl.Int64


# --- id ------------------------------------------------------------------------------------------------------
def test_id_single_key_copies_the_key() -> None:
    canon = canonicalize(pd.DataFrame({"user_id": ["a", "b"], "v": [1, 2]}), key_columns=["user_id"])
    assert canon.frame.columns == ["user_id", "v", "id"]
    assert canon.frame["id"].to_list() == ["a", "b"]
    assert canon.kinds["id"] == "string"


def test_id_composite_key_joins_parts() -> None:
    df = pd.DataFrame({"shop": ["eu", "us"], "n": [1, 2], "day": [dt.date(1970, 1, 2), dt.date(1970, 1, 1)]})
    canon = canonicalize(df, key_columns=["shop", "n", "day"])
    assert canon.frame["id"].to_list() == ["eu:1:86400000", "us:2:0"]
    assert canon.kinds["id"] == "string"


def test_existing_id_is_left_alone() -> None:
    canon = canonicalize(pd.DataFrame({"k": [1], "id": ["x"]}), key_columns=["k"])
    assert canon.frame.columns == ["k", "id"]
    assert canon.frame["id"].to_list() == ["x"]


# --- nesting -------------------------------------------------------------------------------------------------
def test_dotted_columns_nest() -> None:
    df = pd.DataFrame(
        {
            "k": [1],
            "marketingPreferences.email": [True],
            "marketingPreferences.phone": [False],
            "a.b.c": [1],
            "a.d": ["x"],
        }
    )
    assert rows_of(df) == [
        {
            "k": 1,
            "marketingPreferences": {"email": True, "phone": False},
            "a": {"b": {"c": 1}, "d": "x"},
            "id": 1,
        }
    ]
    canon = canonicalize(df, key_columns=["k"])
    flat = json.loads(encode_rows(canon.frame, canon.kinds, nest_dotted_columns=False)[0])
    assert flat["marketingPreferences.email"] is True


@pytest.mark.parametrize("columns", [["a", "a.b"], ["a.b", "a"], ["a.b", "a.b.c"]])
def test_dotted_clash_raises(columns: list[str]) -> None:
    frame = pl.DataFrame({c: [1] for c in columns})
    with pytest.raises(SourceDataError, match=r"clash|cannot be both"):
        encode_rows(frame, dict.fromkeys(columns, "int"))


def test_encode_rows_empty_frame() -> None:
    assert encode_rows(pl.DataFrame({"a": []}, schema={"a": pl.Int64}), {"a": "int"}).len() == 0


# --- encoding properties -------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=30))
def test_floats_round_trip(values: list[float]) -> None:
    frame = pl.DataFrame({"v": pl.Series(values, dtype=pl.Float64)})
    out = [json.loads(t)["v"] for t in encode_rows(frame, {"v": "float"})]
    for got, want in zip(out, values, strict=True):
        if not math.isfinite(want):
            assert got is None
        elif want == int(want) and abs(want) < 2**63:
            assert got == int(want)
            assert isinstance(got, int)
        else:
            assert got == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text()), min_size=1, max_size=20))
def test_strings_round_trip(values: list[str | None]) -> None:
    # polars strings are UTF-8: lone surrogates cannot occur in a frame
    values = [v.encode("utf-8", "replace").decode() if v is not None else None for v in values]
    frame = pl.DataFrame({'we"ird\\name': pl.Series(values, dtype=pl.String)})
    out = [json.loads(t) for t in encode_rows(frame, {'we"ird\\name': "string"})]
    assert out == [{'we"ird\\name': v} for v in values]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=20))
def test_ints_exact(values: list[int]) -> None:
    df = pd.DataFrame({"k": range(len(values)), "v": np.array(values, dtype="int64")})
    assert [r["v"] for r in rows_of(df)] == values


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.decimals(
            allow_nan=False,
            allow_infinity=False,
            min_value=-D("1.7976931348623157e308"),  # beyond the largest double a decimal is refused as a number
            max_value=D("1.7976931348623157e308"),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_decimals_exact(values: list[decimal.Decimal]) -> None:
    kind, out = values_of(list(values), parse_float=D)
    assert kind == "decimal"
    assert out == values


# --- updates ---------------------------------------------------------------------------------------------------
def test_encode_updates_envelope() -> None:
    rows = pl.Series(['{"id":1,"a":"x"}', '{"id":2}'])
    updates = encode_updates(
        pl.Series(["insert", "delete"]),
        rows,
        pl.Series([JAN1, JAN1 + 1]),
        pl.Series([JAN1 + 2, JAN1 + 3]),
        brand_id=7,
        table_name='us"er',
    )
    assert [json.loads(u) for u in updates] == [
        {
            "type": "insert",
            "data": {
                "brandId": 7,
                "tableName": 'us"er',
                "data": {"id": 1, "a": "x"},
                "createdAt": JAN1,
                "updatedAt": JAN1 + 2,
            },
        },
        {
            "type": "delete",
            "data": {
                "brandId": 7,
                "tableName": 'us"er',
                "data": {"id": 2},
                "createdAt": JAN1 + 1,
                "updatedAt": JAN1 + 3,
            },
        },
    ]


def test_encode_updates_rejects_bad_input() -> None:
    one = pl.Series([1])
    with pytest.raises(ValueError, match="upsert"):
        encode_updates(pl.Series(["upsert"]), pl.Series(["{}"]), one, one, brand_id=1, table_name="t")
    with pytest.raises(ValueError, match="Length"):
        encode_updates(pl.Series(["insert"]), pl.Series(["{}", "{}"]), one, one, brand_id=1, table_name="t")
    with pytest.raises(ValueError, match="null"):
        encode_updates(
            pl.Series(["insert"]), pl.Series(["{}"]), pl.Series([None], dtype=pl.Int64), one, brand_id=1, table_name="t"
        )
    empty = encode_updates(
        pl.Series([], dtype=pl.String),
        pl.Series([], dtype=pl.String),
        pl.Series([], dtype=pl.Int64),
        pl.Series([], dtype=pl.Int64),
        brand_id=1,
        table_name="t",
    )
    assert empty.len() == 0


def test_end_to_end_update_from_pandas() -> None:
    df = pd.DataFrame({"k": ["u1"], "marketingPreferences.email": [True], "score": [3.0]})
    canon = canonicalize(df, key_columns=["k"])
    rows = encode_rows(canon.frame, canon.kinds)
    update = encode_updates(
        pl.Series(["update"]), rows, pl.Series([JAN1]), pl.Series([JAN1]), brand_id=1, table_name="user"
    )
    assert json.loads(update[0])["data"]["data"] == {
        "k": "u1",
        "marketingPreferences": {"email": True},
        "score": 3,
        "id": "u1",
    }


# --- chunks ----------------------------------------------------------------------------------------------------
ENVELOPE = len(b'{"data":[]}')


def body_size(sizes: list[int]) -> int:
    return ENVELOPE + sum(sizes) + max(len(sizes) - 1, 0)


@pytest.mark.parametrize(
    ("sizes", "chunk_size", "max_bytes", "expected"),
    [
        pytest.param([], 10, 1000, [], id="empty"),
        pytest.param([10] * 5, 2, 10_000, [(0, 2), (2, 4), (4, 5)], id="by rows"),
        pytest.param([10] * 5, 100, ENVELOPE + 10 + 1 + 10, [(0, 2), (2, 4), (4, 5)], id="by bytes exact boundary"),
        pytest.param([10] * 5, 100, ENVELOPE + 10 + 1 + 10 - 1, [(i, i + 1) for i in range(5)], id="one byte short"),
        pytest.param([10, 30, 10, 10], 100, ENVELOPE + 32, [(0, 1), (1, 2), (2, 4)], id="greedy in order"),
        pytest.param([5], 1, ENVELOPE + 5, [(0, 1)], id="single exactly fits"),
    ],
)
def test_plan_chunks(sizes: list[int], chunk_size: int, max_bytes: int, expected: list[tuple[int, int]]) -> None:
    assert plan_chunks(np.array(sizes, dtype=np.int64), chunk_size=chunk_size, max_chunk_bytes=max_bytes) == expected


def test_plan_chunks_oversize_update_raises() -> None:
    with pytest.raises(SourceDataError, match=r"position 2 is 50 bytes.*max_chunk_bytes=40"):
        plan_chunks(np.array([5, 5, 50, 5]), chunk_size=10, max_chunk_bytes=40)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=50), max_size=60),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=ENVELOPE + 50, max_value=400),
)
def test_plan_chunks_properties(sizes: list[int], chunk_size: int, max_bytes: int) -> None:
    ranges = plan_chunks(np.array(sizes, dtype=np.int64), chunk_size=chunk_size, max_chunk_bytes=max_bytes)
    position = 0
    for start, end in ranges:
        assert start == position
        assert 0 < end - start <= chunk_size
        assert body_size(sizes[start:end]) <= max_bytes
        if end < len(sizes):  # greedy: one more would break a limit
            assert end - start == chunk_size or body_size(sizes[start : end + 1]) > max_bytes
        position = end
    assert position == len(sizes)


def test_chunk_body_matches_plan_sizes() -> None:
    updates = pl.Series(['{"a":"é"}', '{"b":2}', "{}"])
    sizes = updates.str.len_bytes().to_numpy()
    ranges = plan_chunks(sizes, chunk_size=2, max_chunk_bytes=1000)
    bodies = [chunk_body(updates, s, e) for s, e in ranges]
    assert bodies == ['{"data":[{"a":"é"},{"b":2}]}'.encode(), b'{"data":[{}]}']
    assert len(bodies[0]) == body_size(sizes[0:2].tolist())
    raw = [u.encode() for u in updates]
    assert chunk_body(raw, 0, 3) == b'{"data":[' + b",".join(raw) + b"]}"
    assert chunk_body(raw, 1, 1) == b'{"data":[]}'
    with pytest.raises(ValueError, match="range"):
        chunk_body(raw, 2, 4)


def test_long_json_columns_are_dumped_in_batches_without_losing_order_or_nulls() -> None:
    """Over 250k values the JSON column is dumped batch by batch; every row keeps its own value."""
    n = 250_000 * 2 + 17
    values: list[Any] = [{"n": i, "tag": "x" * (i % 3)} if i % 1000 else None for i in range(n)]
    canon = canonicalize(pd.DataFrame({"id": np.arange(n), "doc": values}), key_columns=["id"])
    assert canon.kinds["doc"] == "json"
    docs = canon.frame.get_column("doc")
    assert docs.null_count() == len(range(0, n, 1000))
    for i in (1, 249_999, 250_000, 250_001, 499_999, 500_001, n - 1):
        assert (None if docs[i] is None else json.loads(docs[i])) == values[i]


@pytest.mark.parametrize("window", [1, 2, 64])
def test_chunk_bodies_equal_chunk_body_and_skip_acknowledged_chunks(window: int) -> None:
    updates = pl.Series([json.dumps({"n": i}) for i in range(23)], dtype=pl.String)
    chunks = plan_chunks(updates.str.len_bytes().to_numpy(), chunk_size=4, max_chunk_bytes=10_000)
    todo = [i for i in range(len(chunks)) if i not in {0, 3}]  # a resumed plan: chunks 0 and 3 acknowledged
    got = list(chunk_bodies(updates, chunks, todo, window=window))
    assert [index for index, _ in got] == todo
    for index, body in got:
        assert body == chunk_body(updates, *chunks[index])
        assert len(json.loads(body)["data"]) == chunks[index][1] - chunks[index][0]
