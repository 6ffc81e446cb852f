"""The ``id`` StopChurn keys rows by (derived, escaped, checked over the table) and values JSON must carry exactly:
decimals within the double range, object keys that stay distinct as JSON text, numpy arrays and Arrow
lists/structs as JSON arrays/objects in one canonical form."""

from __future__ import annotations

import datetime as dt
import decimal
import json
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_stopchurn.encode.records import encode_rows
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.frame import canonicalize

D = decimal.Decimal
JAN1 = 1577836800000  # 2020-01-01T00:00:00Z in ms
DOUBLE_MAX = D("1.7976931348623157e308")


def sent(df: pd.DataFrame, keys: list[str], **kwargs: Any) -> list[dict[str, Any]]:
    """The rows as StopChurn receives them (decimals parsed exactly)."""
    canon = canonicalize(df, key_columns=keys, **kwargs)
    return [json.loads(text, parse_float=D) for text in encode_rows(canon.frame, canon.kinds, **kwargs)]


def refused(df: pd.DataFrame, keys: list[str], **kwargs: Any) -> str:
    with pytest.raises(SourceDataError) as info:
        canonicalize(df, key_columns=keys, **kwargs)
    return str(info.value)


def unescape_id(text: str) -> tuple[str, ...]:
    """The inverse of the documented composite-id rule: split at unescaped ':', then unescape."""
    parts, current, chars = [], [], iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return tuple(parts)


# --- derived composite ids -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param("a", "b", "a:b", id="plain parts: the id of before"),
        pytest.param("brand", 42, "brand:42", id="string and int"),
        pytest.param("x:y", "z", "x\\:y:z", id="colon in the first part"),
        pytest.param("x", "y:z", "x:y\\:z", id="colon in the second part"),
        pytest.param("a\\", "b", "a\\\\:b", id="backslash at the end of a part"),
        pytest.param("a", "\\:b", "a:\\\\\\:b", id="backslash before a colon"),
        pytest.param("", "", ":", id="empty parts"),
        pytest.param("::", ":", "\\:\\::\\:", id="only colons"),
        pytest.param(-7, "é:😀", "-7:é\\:😀", id="negative int, unicode"),
        pytest.param("d", dt.date(1970, 1, 2), "d:86400000", id="date as epoch ms"),
    ],
)
def test_composite_id_escapes_separator_and_escape_character(a: Any, b: Any, expected: str) -> None:
    df = pd.DataFrame({"a": pd.Series([a], dtype=object), "b": pd.Series([b], dtype=object), "v": [1]})
    row = sent(df, ["a", "b"])[0]
    assert row["id"] == expected
    assert unescape_id(row["id"]) == (str(a), expected.rsplit(":", 1)[1] if not isinstance(b, str) else b)


def test_parts_with_separators_that_collided_before_get_distinct_ids() -> None:
    df = pd.DataFrame({"a": ["x:y", "x", "x\\", "x"], "b": ["z", "y:z", ":z", "\\:z"], "v": [1, 2, 3, 4]})
    ids = [r["id"] for r in sent(df, ["a", "b"])]
    assert ids == ["x\\:y:z", "x:y\\:z", "x\\\\:\\:z", "x:\\\\\\:z"]
    assert len(set(ids)) == 4
    assert [unescape_id(i) for i in ids] == list(zip(df["a"], df["b"], strict=True))


_PLAIN = st.text(st.characters(blacklist_characters=":\\", blacklist_categories=["Cs"]), max_size=6)
_TRICKY = st.text(st.sampled_from(["a", ":", "\\", "é"]), max_size=5)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_PLAIN, _PLAIN, st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=20, unique=True))
def test_plain_parts_keep_the_id_of_before(keys: list[tuple[str, str, int]]) -> None:
    """Parts without ':' or '\\' are joined as before (existing snapshots and StopChurn rows keep their ids)."""
    df = pd.DataFrame(keys, columns=["a", "b", "c"])
    assert [r["id"] for r in sent(df, ["a", "b", "c"])] == [f"{a}:{b}:{c}" for a, b, c in keys]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_TRICKY, _TRICKY, _TRICKY), min_size=1, max_size=30, unique=True))
def test_distinct_composite_keys_have_distinct_ids_that_decode_back(keys: list[tuple[str, str, str]]) -> None:
    df = pd.DataFrame(keys, columns=["a", "b", "c"])
    canon = canonicalize(df, key_columns=["a", "b", "c"])
    ids = canon.frame["id"].to_list()
    assert len(set(ids)) == len(keys)
    assert [unescape_id(i) for i in ids] == keys


# --- the source's own id column ------------------------------------------------------------------------------
REMEDY = ["StopChurn keys rows by 'id'", "Drop or rename the source's 'id' column", "make 'id' the key"]

ID_REFUSED: list[tuple[str, pd.DataFrame, list[str], list[str]]] = [
    (
        "tenant/id collision",
        pd.DataFrame({"tenant": ["t1", "t2", "t1", "t2"], "id": [7, 7, 8, 9], "v": range(4)}),
        ["tenant", "id"],
        ["Column 'id' has duplicate value(s) 7:", "collapse into one row at StopChurn", "'tenant', 'id'", *REMEDY],
    ),
    (
        "separate key, duplicate string ids, at most five listed",
        pd.DataFrame({"user_key": range(14), "id": [f"u{n % 7}" for n in range(14)]}),
        ["user_key"],
        ["duplicate value(s) 'u0', 'u1', 'u2', 'u3', 'u4' (and 2 more)", "not the key 'user_key'", *REMEDY],
    ),
    (
        "null id, with the keys of the rows",
        pd.DataFrame({"pk": ["a", "b", "c"], "id": ["u1", None, None]}),
        ["pk"],
        ["Column 'id' has 2 missing value(s)", "key 'b', 'c'", "every row sent needs an id", *REMEDY],
    ),
    (
        "NaN and inf ids",
        pd.DataFrame({"pk": [1, 2, 3, 4, 5, 6, 7], "id": [1.0, np.nan, np.inf, np.nan, np.nan, np.nan, np.nan]}),
        ["pk"],
        ["6 missing value(s) (null/NaN/inf)", "key 2, 3, 4, 5, 6 (and 1 more)"],
    ),
    (
        "composite key beside a null id",
        pd.DataFrame({"a": [1, 1], "b": ["x", "y"], "id": pd.array([None, 5], dtype="Int64")}),
        ["a", "b"],
        ["1 missing value(s)", "key (1, 'x')"],
    ),
    (
        "bool id",
        pd.DataFrame({"pk": [1, 2], "id": [True, False]}),
        ["pk"],
        ["Column 'id' holds booleans", "strings or numbers", *REMEDY],
    ),
    (
        "nullable boolean id",
        pd.DataFrame({"pk": [1, 2], "id": pd.array([True, False], dtype="boolean")}),
        ["pk"],
        ["holds booleans"],
    ),
    (
        "fractional float id",
        pd.DataFrame({"pk": [1, 2, 3], "id": [1.0, 2.5, 3.25]}),
        ["pk"],
        ["Column 'id' has non-integral value(s) 2.5, 3.25", "whole numbers", *REMEDY],
    ),
    (
        "fractional decimal id",
        pd.DataFrame({"pk": [1, 2], "id": pd.Series([D("1"), D("1.50")], dtype=object)}),
        ["pk"],
        ["non-integral value(s) '1.5'"],
    ),
    (
        "mixed-type ids",
        pd.DataFrame({"pk": [1, 2], "id": pd.Series([1, "1"], dtype=object)}),
        ["pk"],
        ["Column 'id' holds JSON values or mixes value types", "one type per table", *REMEDY],
    ),
    (
        "whole floats that are equal",
        pd.DataFrame({"pk": [1, 2], "id": [3.0, 3.0]}),
        ["pk"],
        ["duplicate value(s) 3.0"],
    ),
    ("bool id as the key", pd.DataFrame({"id": [True, False]}), ["id"], ["Key column 'id' has kind 'bool'"]),
    ("duplicate id as the key", pd.DataFrame({"id": [1, 1]}), ["id"], ["Duplicate key value(s) in 'id': 1"]),
    ("null id as the key", pd.DataFrame({"id": ["a", None]}), ["id"], ["Key column 'id' has 1 missing value"]),
]


@pytest.mark.parametrize(("df", "keys", "words"), [pytest.param(d, k, w, id=n) for n, d, k, w in ID_REFUSED])
def test_id_column_is_checked_over_the_whole_table(df: pd.DataFrame, keys: list[str], words: list[str]) -> None:
    message = refused(df, keys)
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("df", "keys", "ids"),
    [
        pytest.param(pd.DataFrame({"pk": [1, 2], "id": ["u1", "u2"]}), ["pk"], ["u1", "u2"], id="unique strings"),
        pytest.param(
            pd.DataFrame({"tenant": ["t1", "t2"], "id": [7, 8]}), ["tenant", "id"], [7, 8], id="tenant/id unique"
        ),
        pytest.param(pd.DataFrame({"pk": [1, 2], "id": [1.0, 2.0]}), ["pk"], [1, 2], id="whole floats as integers"),
        pytest.param(
            pd.DataFrame({"pk": [1, 2], "id": pd.Series([D("10"), D("2E+3")], dtype=object)}),
            ["pk"],
            [10, 2000],
            id="whole decimals",
        ),
        pytest.param(pd.DataFrame({"id": [3, 1]}), ["id"], [3, 1], id="id is the key"),
        pytest.param(pd.DataFrame({"id": [3.0, 1.0]}), ["id"], [3, 1], id="float id is the key"),
    ],
)
def test_valid_id_columns_are_sent_as_they_are(df: pd.DataFrame, keys: list[str], ids: list[Any]) -> None:
    got = [r["id"] for r in sent(df, keys)]
    assert got == ids
    assert [type(i) for i in got] == [type(i) for i in ids]


def test_empty_table_with_an_id_column_is_accepted() -> None:
    df = pd.DataFrame({"pk": pd.Series([], dtype="int64"), "id": pd.Series([], dtype=object)})
    assert canonicalize(df, key_columns=["pk"]).frame.height == 0


# --- object float keys ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "words"),
    [
        pytest.param([1.5, 2.5], ["Key column 'k'", "non-integral value(s) 1.5, 2.5", "whole numbers"], id="fractions"),
        pytest.param([1, 2.5], ["non-integral value(s) 2.5"], id="ints and a fraction"),
        pytest.param([1.0, np.inf], ["non-finite", "row(s) 1"], id="infinity"),
    ],
)
def test_object_float_keys_get_the_float_key_checks(values: list[Any], words: list[str]) -> None:
    message = refused(pd.DataFrame({"k": pd.Series(values, dtype=object)}), ["k"])
    for word in words:
        assert word in message


def test_object_whole_float_keys_become_integers() -> None:
    canon = canonicalize(pd.DataFrame({"k": pd.Series([1.0, 2, 3.0], dtype=object)}), key_columns=["k"])
    assert canon.kinds["k"] == "int"
    assert canon.frame["k"].to_list() == [1, 2, 3]


# --- decimals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "shown"),
    [
        pytest.param([D("1E+400")], "'1E+400'", id="1E+400"),
        pytest.param([D("1"), D("-1E+400")], "'-1E+400'", id="-1E+400"),
        pytest.param([D("1.7976931348623158e308")], "'1.7976931348623158E+308'", id="just above the largest double"),
    ],
)
def test_decimals_a_json_number_cannot_carry_are_refused(values: list[Any], shown: str) -> None:
    df = pd.DataFrame({"k": range(len(values)), "amount": pd.Series(values, dtype=object)})
    message = refused(df, ["k"])
    assert f"Column 'amount' holds decimal value(s) that a JSON number cannot carry: {shown}." in message
    assert "1.7976931348623157e308" in message
    assert "decimal_as_string=True" in message


@pytest.mark.parametrize(
    "value",
    [DOUBLE_MAX, -DOUBLE_MAX, D("1E+308"), D("1E-400"), D("123456789012345678901234567890.5")],
    ids=str,
)
def test_decimals_within_the_double_range_are_exact_numbers(value: decimal.Decimal) -> None:
    df = pd.DataFrame({"k": [1], "amount": pd.Series([value], dtype=object)})
    assert sent(df, ["k"])[0]["amount"] == value


def test_decimal_as_string_sends_large_decimals_as_text_and_nan_as_null() -> None:
    values = [D("1E+400"), D("-1E+400"), D("NaN"), D("Infinity"), D("1.50"), None]
    df = pd.DataFrame({"k": range(6), "amount": pd.Series(values, dtype=object)})
    got = [r["amount"] for r in sent(df, ["k"], decimal_as_string=True)]
    assert got == ["1E400", "-1E400", None, None, "1.5", None]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param({"a": D("1E+400")}, "'1E+400'", id="in a dict"),
        pytest.param([1, [D("NaN")]], "'NaN'", id="in a nested list"),
        pytest.param({"a": D("-Infinity")}, "'-Infinity'", id="infinity"),
    ],
)
def test_decimals_inside_json_values_are_bounded_too(value: Any, shown: str) -> None:
    for as_string in (False, True):  # decimals inside JSON values are always numbers
        df = pd.DataFrame({"k": [1], "doc": pd.Series([value], dtype=object)})
        message = refused(df, ["k"], decimal_as_string=as_string)
        assert f"Column 'doc' holds a decimal {shown} inside a JSON value" in message
        assert "1.7976931348623157e308" in message


def test_arrow_decimals_are_unchanged() -> None:
    col = pd.Series([D("1.50"), None], dtype=pd.ArrowDtype(pa.decimal128(10, 2)))
    assert [r["v"] for r in sent(pd.DataFrame({"k": [1, 2], "v": col}), ["k"])] == [D("1.5"), None]


# --- JSON object keys ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "key"),
    [
        pytest.param({1: "a", "1": "b"}, "'1'", id="1 and '1'"),
        pytest.param({True: 1, "true": 2}, "'true'", id="True and 'true'"),
        pytest.param({None: 1, "null": 2}, "'null'", id="None and 'null'"),
        pytest.param({1.5: 1, "1.5": 2}, "'1.5'", id="float"),
        pytest.param({dt.date(2020, 1, 1): 1, "2020-01-01": 2}, "'2020-01-01'", id="date"),
        pytest.param([{"ok": 1}, {"x": {2: "a", "2": "b"}}], "'2'", id="nested"),
    ],
)
def test_object_keys_that_collide_as_json_text_are_refused(value: Any, key: str) -> None:
    df = pd.DataFrame({"k": [1, 2], "doc": pd.Series([{"fine": 1}, value], dtype=object)})
    message = refused(df, ["k"])
    assert "Column 'doc' holds 1 value(s) with objects whose keys collide once written as JSON keys" in message
    assert f"which are text: {key} " in message
    assert "cannot hold a key twice" in message


@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param({True: 1, "True": 2}, '{"True":2,"true":1}', id="True and 'True' stay distinct"),
        pytest.param({1: "a", "b": 2}, '{"1":"a","b":2}', id="int key"),
        pytest.param({"b": 1, "a": {3: None}}, '{"a":{"3":null},"b":1}', id="nested int key"),
        pytest.param({"é": 1, "a": 2, "Z": 3}, '{"Z":3,"a":2,"é":1}', id="string keys sorted"),
    ],
)
def test_distinct_object_keys_are_written_as_text(value: Any, text: str) -> None:
    df = pd.DataFrame({"k": [1, 2], "doc": pd.Series([value, {1: 1}], dtype=object)})
    assert canonicalize(df, key_columns=["k"]).frame["doc"].to_list() == [text, '{"1":1}']


# --- numpy arrays and Arrow lists/structs --------------------------------------------------------------------
def arrow(values: list[Any], type_: pa.DataType) -> pd.Series:
    return pd.Series(pd.array(values, dtype=pd.ArrowDtype(type_)))


def objects(values: list[Any]) -> pd.Series:
    cells = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):  # cell by cell, so that numpy builds no 2-D array of equal-length lists
        cells[i] = value
    return pd.Series(cells, dtype=object)


SAME_JSON: list[tuple[str, list[pd.Series], list[str | None]]] = [
    (
        "int lists",
        [
            objects([[1, 2], None, []]),
            objects([np.array([1, 2]), None, np.array([], dtype=np.int64)]),
            objects([(1, 2), None, ()]),
            arrow([[1, 2], None, []], pa.list_(pa.int64())),
            arrow([[1, 2], None, []], pa.large_list(pa.int32())),
        ],
        ["[1,2]", None, "[]"],
    ),
    (
        "float lists, NaN as null",
        [
            objects([[1.5, 2.0, None], [float("nan")]]),
            objects([np.array([1.5, 2.0, np.nan]), np.array([np.nan])]),
            arrow([[1.5, 2.0, None], [None]], pa.list_(pa.float64())),
        ],
        ["[1.5,2.0,null]", "[null]"],
    ),
    (
        "fixed-size lists and 2-D arrays",
        [
            objects([[[1, 2], [3, 4]]]),
            objects([np.array([[1, 2], [3, 4]])]),
            objects([np.array([[1, 2, 0], [3, 4, 0]])[:, :2]]),  # not contiguous
            arrow([[[1, 2], [3, 4]]], pa.list_(pa.list_(pa.int64(), 2))),
        ],
        ["[[1,2],[3,4]]"],
    ),
    (
        "objects with keys in any order",
        [
            objects([{"b": 1, "a": [1.5]}, {"b": None, "a": None}]),
            objects([{"a": np.array([1.5]), "b": 1}, {"a": None, "b": None}]),
            arrow(
                [{"b": 1, "a": [1.5]}, {"b": None, "a": None}],
                pa.struct([("b", pa.int64()), ("a", pa.list_(pa.float64()))]),
            ),
        ],
        ['{"a":[1.5],"b":1}', '{"a":null,"b":null}'],
    ),
    (
        "lists of objects holding timestamps, dates and decimals",
        [
            objects([[{"t": dt.datetime(2020, 1, 1, tzinfo=dt.UTC), "d": dt.date(2020, 1, 1), "n": D("2.50")}]]),
            objects([np.array([{"t": dt.datetime(2020, 1, 1), "d": dt.date(2020, 1, 1), "n": D("2.5")}])]),
            arrow(
                [[{"t": dt.datetime(2020, 1, 1, tzinfo=dt.UTC), "d": dt.date(2020, 1, 1), "n": D("2.50")}]],
                pa.list_(pa.struct([("t", pa.timestamp("us", "UTC")), ("d", pa.date32()), ("n", pa.decimal128(5, 2))])),
            ),
        ],
        [f'[{{"d":{JAN1},"n":2.5,"t":{JAN1}}}]'],
    ),
    (
        "maps as objects",
        [
            objects([{"x": 1, "y": 2}, None]),
            arrow([[("y", 2), ("x", 1)], None], pa.map_(pa.string(), pa.int64())),
        ],
        ['{"x":1,"y":2}', None],
    ),
    (
        "strings and booleans",
        [
            objects([["a", 'q"'], [True, False]]),
            objects([np.array(["a", 'q"']), np.array([True, False])]),
            objects([np.array(["a", 'q"'], dtype=object), np.array([True, False], dtype=object)]),
        ],
        ['["a","q\\""]', "[true,false]"],
    ),
]


@pytest.mark.parametrize(("columns", "expected"), [pytest.param(c, e, id=name) for name, c, e in SAME_JSON])
def test_a_value_has_one_canonical_json_whichever_way_it_arrives(
    columns: list[pd.Series], expected: list[str | None]
) -> None:
    frames = []
    for col in columns:
        df = pd.DataFrame({"k": range(len(expected)), "v": col})
        canon = canonicalize(df, key_columns=["k"])
        assert canon.kinds["v"] == "json", col.dtype
        assert canon.frame["v"].to_list() == expected, col.dtype
        rows = [json.loads(t) for t in encode_rows(canon.frame, canon.kinds)]
        assert [r["v"] for r in rows] == [None if e is None else json.loads(e) for e in expected]
        frames.append(canon.frame)
    for frame in frames[1:]:  # the canonical frame is what the snapshot hashes: no change is seen
        assert frame.equals(frames[0])


def test_numpy_arrays_nested_in_dicts_and_lists() -> None:
    value = {"m": np.array([[1.5, 2.5]]), "l": [np.array([1, 2]), np.array([None, "x"], dtype=object)]}
    df = pd.DataFrame({"k": [1], "doc": objects([value])})
    assert sent(df, ["k"])[0]["doc"] == {"l": [[1, 2], [None, "x"]], "m": [[D("1.5"), D("2.5")]]}


def test_numpy_array_of_unsupported_values_is_refused_naming_the_column() -> None:
    df = pd.DataFrame({"k": [1], "doc": objects([np.array([1 + 2j])])})
    assert "Column 'doc' holds a value that cannot be written as JSON" in refused(df, ["k"])
    df = pd.DataFrame({"k": [1], "doc": objects([np.array([b"x"], dtype=object)])})
    assert "binary" in refused(df, ["k"])


def test_arrow_container_as_a_key_is_refused() -> None:
    df = pd.DataFrame({"k": arrow([[1], [2]], pa.list_(pa.int64()))})
    assert "holds JSON values (lists, objects)" in refused(df, ["k"])


def test_arrow_struct_column_in_a_full_row() -> None:
    df = pd.DataFrame(
        {
            "k": [1, 2],
            "tags": arrow([["a", "b"], None], pa.list_(pa.string())),
            "prefs": arrow(
                [{"phone": False, "email": True}, None], pa.struct([("phone", pa.bool_()), ("email", pa.bool_())])
            ),
        }
    )
    canon = canonicalize(df, key_columns=["k"])
    assert encode_rows(canon.frame, canon.kinds).to_list() == [
        '{"k":1,"tags":["a","b"],"prefs":{"email":true,"phone":false},"id":1}',
        '{"k":2,"tags":null,"prefs":null,"id":2}',
    ]
    assert canon.frame.schema["tags"] == pl.String


def test_arrow_map_with_a_repeated_key_is_refused() -> None:
    df = pd.DataFrame({"k": [1], "m": arrow([[("a", 1), ("a", 2)]], pa.map_(pa.string(), pa.int64()))})
    assert "Column 'm' holds a map with a repeated key" in refused(df, ["k"])


@pytest.mark.parametrize("value", [D("NaN"), D("Infinity"), D("-Infinity")])
def test_non_finite_decimals_are_null_like_floats(value: D) -> None:
    canon = canonicalize(pd.DataFrame({"id": [1, 2], "amount": [value, D("1.5")]}), key_columns=["id"])
    assert canon.frame.get_column("amount").to_list() == [None, "1.5"]
