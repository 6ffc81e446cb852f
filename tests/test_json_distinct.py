"""JSON columns are converted one distinct text at a time, and every row still gets its exact canonical text.

A JSON column (PostgreSQL json/jsonb, MySQL's JSON, ``json_columns``) repeats its values; each distinct text is parsed
and written once, and its canonical text put back in every row holding it. What is sent and what the snapshot holds
(and hashes) is that text, so it must be byte for byte the text each row had when every row was parsed on its own:
the PostgreSQL cases below pin those texts (nested objects, key order, unicode, escapes, numbers such as 1.0, 1e3,
-0, long integers), and a property compares every row with an independent writer (``json`` + ``orjson``).
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.arrow_values import convert_arrow_column
from airflow_provider_stopchurn.source.canonical import canonicalize_source
from airflow_provider_stopchurn.source.sql import postgres_uri, read_postgres


def json_column(texts: list[str | None]) -> pa.Array:
    """Texts as an ``arrow.json`` column, as the ADBC driver delivers json/jsonb."""
    return pa.ExtensionArray.from_storage(pa.json_(), pa.array(texts, pa.string()))


def test_repeated_json_values_are_parsed_once() -> None:
    values = [
        '{"sms": true, "email": false, "frequency": "weekly"}',
        '{"sms": false, "email": true, "frequency": "daily"}',
        '[1, 2.5, {"b": null, "a": "x"}]',
        None,
    ]
    column = json_column([values[i % 4] for i in range(200_000)])
    tracemalloc.start()
    try:
        series, kind = convert_arrow_column("prefs", column)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kind == "json"
    assert series.head(4).to_list() == [
        '{"email":false,"frequency":"weekly","sms":true}',
        '{"email":true,"frequency":"daily","sms":false}',
        '[1,2.5,{"a":"x","b":null}]',
        None,
    ]
    # one Python object per row (a dict, its keys, the JSON text) took about 140 MB of Python memory here; three
    # distinct values take a few kilobytes
    assert peak < 20_000_000, f"{peak:,} bytes of Python objects for three distinct values"


# --- every row gets the text it would get alone -----------------------------------------------------------------
_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _texts(draw: Any) -> str:
    """A JSON value written as a source may write it: any key order, spacing and escaping."""
    value = draw(_values)
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" , ", " : ")]))
    return json.dumps(
        value, separators=separators, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1]))
    )


@given(
    distinct=st.lists(_texts(), min_size=1, max_size=12),
    picks=st.lists(st.integers(0, 11), min_size=1, max_size=60),
    nulls=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_every_row_gets_its_own_canonical_text(distinct: list[str], picks: list[int], nulls: bool) -> None:
    texts: list[str | None] = [distinct[pick % len(distinct)] for pick in picks]
    if nulls:
        texts[::3] = [None] * len(texts[::3])
    series, kind = convert_arrow_column("v", json_column(texts))
    assert kind == "json"
    expected = [None if t is None else orjson.dumps(json.loads(t), option=orjson.OPT_SORT_KEYS).decode() for t in texts]
    assert series.to_list() == expected


# --- PostgreSQL: the texts the rows had when each was parsed on its own -----------------------------------------
#: (written in SQL, canonical text of jsonb, canonical text of json): the texts every row was given before
_CASES = [
    ('{"b": 1, "a": {"d": [1, 2.5, null], "c": "x"}}', '{"a":{"c":"x","d":[1,2.5,null]},"b":1}', None),
    (
        '{"aa": 1, "b": 2, "é": 3, "😀": 4, "Z": 5, "": 6, " ": 7, "a!": 8, "a": 9}',
        '{"":6," ":7,"Z":5,"a":9,"a!":8,"aa":1,"b":2,"é":3,"😀":4}',
        None,
    ),
    (
        "[1.0, 1e3, -0, -0.0, 0.1, 1E-7, 2.50, 100]",
        "[1.0,1000,0,0.0,0.1,1e-7,2.5,100]",
        "[1.0,1000.0,0,-0.0,0.1,1e-7,2.5,100]",
    ),
    (
        '{"big": 9007199254740993, "neg": -9223372036854775808}',
        '{"big":9007199254740993,"neg":-9223372036854775808}',
        None,
    ),
    (
        r'{"s": "quote \" back \\ nl \n tab \t uni \u00e9 \ud83d\ude00 ctl \u001f slash /"}',
        '{"s":"quote \\" back \\\\ nl \\n tab \\t uni é 😀 ctl \\u001f slash /"}',
        None,
    ),
    ('{"x": 12345678901234567890.123456789, "z": -1.5e-10}', '{"x":12345678901234567890.123456789,"z":-1.5e-10}', None),
    ('"gold"', '"gold"', None),
    ("42", "42", None),
    ("true", "true", None),
    ("null", "null", None),
    ("{}", "{}", None),
    ("[]", "[]", None),
    ('{"a": 1, "a": 2}', '{"a":2}', None),
    ('{ "spaced" :  [ 1 , { "k" : "v" } ] }', '{"spaced":[1,{"k":"v"}]}', None),
]


def _query(sql_type: str, repeats: int) -> str:
    rows = [
        f"SELECT {n * len(_CASES) + i} AS id, {i} AS case_no, CAST($j${written}$j$ AS {sql_type}) AS v"
        for n in range(repeats)
        for i, (written, _jsonb, _json) in enumerate(_CASES)
    ]
    return " UNION ALL ".join(rows)


@pytest.mark.postgres
@pytest.mark.parametrize("sql_type", ["jsonb", "json"])
@pytest.mark.parametrize("repeats", [1, 5], ids=["each-once", "repeated"])
def test_postgres_json_texts_are_the_texts_each_row_had(postgres_database: Any, sql_type: str, repeats: int) -> None:
    db = postgres_database
    uri = postgres_uri(host=db.host, port=db.port, login=db.user, password=None, database=db.dbname)
    canon = canonicalize_source(lambda: read_postgres(uri, _query(sql_type, repeats)), key_columns=["id"])
    assert canon.kinds["v"] == "json"
    got = canon.frame.sort("id").select("case_no", "v").rows()
    want = [
        (i, jsonb if sql_type == "jsonb" or as_json is None else as_json)
        for _ in range(repeats)
        for i, (_written, jsonb, as_json) in enumerate(_CASES)
    ]
    assert got == want


@pytest.mark.postgres
@pytest.mark.parametrize("repeats", [1, 5], ids=["each-once", "repeated"])
def test_json_numbers_beyond_64_bits_are_refused_as_before(postgres_database: Any, repeats: int) -> None:
    db = postgres_database
    uri = postgres_uri(host=db.host, port=db.port, login=db.user, password=None, database=db.dbname)
    sql = " UNION ALL ".join(
        [f"SELECT {i} AS id, CAST('{{\"n\": 123456789012345678901234567890}}' AS jsonb) AS v" for i in range(repeats)]
    )
    with pytest.raises(SourceDataError, match=r"^Column 'v' holds a value that cannot be written as JSON: Integer"):
        canonicalize_source(lambda: read_postgres(uri, sql), key_columns=["id"])
