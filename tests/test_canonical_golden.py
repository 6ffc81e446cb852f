"""The pandas conversion, pinned: every column kind converts to the same canonical frame, and every bad input is
refused with the same message, as recorded in ``data/canonical_golden.json``.

The recorded file was written by the conversion before its JSON columns were cut from one dump with numpy offsets
(and before a column of dicts skipped ``pd.isna``), so this test compares the faster conversion with the one it
replaced, byte for byte: the kinds, the dtypes, every value, and a digest of a column larger than one dump batch.
Write it again only when a conversion is meant to change (``python tests/test_canonical_golden.py --write``), and
say why in the change.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import sys
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.frame import canonical_columns, canonicalize

GOLDEN = Path(__file__).parent / "data" / "canonical_golden.json"
UTC = dt.UTC
#: Rows of the large column: more than one dump batch (250,000 values), so values meet at a batch boundary.
LARGE = 300_007


def _every_kind() -> pd.DataFrame:
    """Nine rows; one column per dtype and value family the pandas path handles."""
    n = 9
    stamp = dt.datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC)
    uid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    ordered = collections.OrderedDict([("b", 1), ("a", 2)])
    nested = {
        "when": stamp,
        "naive": dt.datetime(1969, 12, 31, 23, 59, 59, 500_000),
        "day": dt.date(2000, 1, 1),
        "time": dt.time(1, 2, 3, 4),
        "span": dt.timedelta(days=-1, seconds=5),
        "exact": Decimal("1.50"),
        "tiny": Decimal("1E-70"),
        "uid": uid,
        "set": {3, 1, 2},
        "tuple": (1, "x"),
        "array": np.array([1.5, 2.0]),
        "npint": np.int64(7),
        "text": 'line\nbreak\t"quoted" \\ é 東京 \x00 \u2028',
    }
    return pd.DataFrame(
        {
            "id": np.arange(1, n + 1, dtype=np.int64),
            "i64": np.array([0, -1, 2**62, 5, 6, 7, 8, 9, 10], dtype=np.int64),
            "i8": np.array([1, 2, 3, 4, 5, 6, 7, 8, -128], dtype=np.int8),
            "nullable_int": pd.array([1, None, 3, None, 5, 6, 7, 8, 9], dtype="Int64"),
            "u64": np.array([0, 1, 2, 3, 4, 5, 6, 7, 2**63 - 1], dtype=np.uint64),
            "f64": [0.1, float("nan"), float("inf"), -float("inf"), 3.0, -0.0, 1e300, 2.5e-300, 7.0],
            "f32": np.array([0.1, 1.5, np.nan, 3, 4, 5, 6, 7, 8], dtype=np.float32),
            "b": [True, False, True, False, True, False, True, False, True],
            "nullable_b": pd.array([True, None, False, True, None, False, True, True, False], dtype="boolean"),
            "obj_str": pd.Series(["a", None, "é", "", "東京", "x\ny", '"q"', "\\", "z"], dtype=object),
            "str_dtype": pd.Series(["a", None, "b", "c", "d", "e", "f", "g", "h"], dtype="str"),
            "arrow_str": pd.Series(["a", None, "b", "c", "d", "e", "f", "g", "h"], dtype="string[pyarrow]"),
            "category": pd.Series(["lo", "hi", "lo", None, "hi", "lo", "lo", "hi", "lo"], dtype="category"),
            "ts_naive": pd.to_datetime(["2024-01-01 00:00:00.123456"] * 8 + [None]),
            "ts_utc": pd.to_datetime(["2024-01-01T01:00:00+01:00"] * 8 + [None], utc=True),
            "ts_paris": pd.to_datetime(["2024-07-01 12:00"] * 9).tz_localize("Europe/Paris"),
            "ts_ms": pd.Series(pd.to_datetime([1, 2, 3, 4, 5, 6, 7, 8, -1], unit="ms")).astype("datetime64[ms]"),
            "obj_datetime": pd.Series([stamp, None, stamp, stamp, stamp, stamp, stamp, stamp, stamp], dtype=object),
            "obj_date": pd.Series([dt.date(1969, 12, 31), None] + [dt.date(2024, 2, 29)] * 7, dtype=object),
            "obj_time": pd.Series([dt.time(1, 2, 3), None] + [dt.time(23, 59, 59, 999_999)] * 7, dtype=object),
            "timedelta": pd.to_timedelta(["1 days 02:03:04.5", None, "-1s", "0s"] + ["3h"] * 5),
            "obj_timedelta": pd.Series([dt.timedelta(seconds=1), None] + [dt.timedelta(days=2)] * 7, dtype=object),
            "decimal": pd.Series(
                [
                    *(Decimal("1.500"), None, Decimal("-0.00"), Decimal("1E+3"), Decimal("0E-30"), Decimal("NaN")),
                    *(Decimal("12345678901234567890.123456789"), Decimal("-1e-70"), Decimal("7")),
                ],
                dtype=object,
            ),
            "uuid": pd.Series([uid, None] + [uuid.UUID(int=i) for i in range(7)], dtype=object),
            "dicts": pd.Series(
                [{"b": 1, "a": [1, 2]}, {}, nested, {"z": None, "y": {"x": [True, False]}}]
                + [{"k": i} for i in range(5)],
                dtype=object,
            ),
            "dicts_missing": pd.Series(
                [{"a": 1}, None, float("nan"), pd.NaT, pd.NA, {"b": [None]}, ordered, {"c": "d"}, None], dtype=object
            ),
            "lists": pd.Series([[1, 2], [], ["a", None], [[1], [2, [3]]], (1, 2), [1.5], [True], [{}], [None]]),
            "arrays": pd.Series([np.arange(3), np.array(["a", "b"]), np.zeros(0)] + [np.ones(2)] * 6, dtype=object),
            "non_str_keys": pd.Series([{1: "a", False: "b", None: "c"}, {2.5: 1}] + [{"s": 1}] * 7, dtype=object),
            "mixed": pd.Series([1, "1", 2.5, True, None, "x\ny", {"a": 1}, [1], "z"], dtype=object),
            "mixed_num": pd.Series([1, 2.5, None, 3, 4, 5, 6, 7, 8], dtype=object),
            "np_scalars": pd.Series([np.int64(1), np.float64(2.5), np.bool_(True)] + [np.int32(3)] * 6, dtype=object),
            "all_none": pd.Series([None] * n, dtype=object),
            "arrow_list": pd.Series(
                [[1, 2], None, [], [3], [4], [5], [6], [7], [8]], dtype=pd.ArrowDtype(pa.list_(pa.int64()))
            ),
            "arrow_struct": pd.Series(
                [{"a": i, "b": str(i)} if i % 3 else None for i in range(n)],
                dtype=pd.ArrowDtype(pa.struct([("a", pa.int64()), ("b", pa.string())])),
            ),
        }
    )


def _large_column() -> pd.Series:
    """Dicts of several shapes (some missing values, text with newlines and separators), seeded."""
    rng = np.random.default_rng(22)
    kinds = rng.integers(0, 6, LARGE)
    numbers = rng.integers(-(10**12), 10**12, LARGE)
    values: list[Any] = []
    for i, (kind, number) in enumerate(zip(kinds.tolist(), numbers.tolist(), strict=True)):
        if kind == 0:
            values.append(None)
        elif kind == 1:
            values.append({"n": number, "text": f"a\n,{i}\n,b"})
        elif kind == 2:
            values.append({"z": [number, None, True], "a": {"nested": i / 7}})
        elif kind == 3:
            values.append([i, str(number)])
        elif kind == 4:
            values.append({"when": dt.date(2000, 1, 1) + dt.timedelta(days=i % 9000), "d": Decimal(number) / 100})
        else:
            values.append({})
    return pd.Series(values, dtype=object)


#: Inputs the conversion refuses: (label, frame); each message is pinned.
def _bad_inputs() -> list[tuple[str, pd.DataFrame]]:
    def one(values: list[Any]) -> pd.DataFrame:
        return pd.DataFrame({"id": np.arange(len(values)), "v": pd.Series(values, dtype=object)})

    return [
        ("bytes", one([b"x", b"y"])),
        ("bytes in a dict", one([{"a": b"x"}, {"a": 1}])),
        ("unsupported type", one([object(), {"a": 1}])),
        ("unsupported type inside a dict", one([{"a": object()}, {"a": 1}])),
        ("colliding keys", one([{1: "a", "1": "b"}, {"x": 1}])),
        ("colliding bool keys", one([{True: "a", "true": "b"}, {2: 1}])),
        ("decimal NaN inside JSON", one([{"a": Decimal("NaN")}, {"a": 1}])),
        ("decimal too large inside JSON", one([{"a": Decimal("1e400")}, {}])),
        ("decimal too large", one([Decimal("1e400"), Decimal(1)])),
        ("big integers", one([2**64, 1])),
        ("duplicate keys", pd.DataFrame({"id": [1, 1, 2], "v": [{"a": 1}, {"a": 2}, {}]})),
        ("missing key", pd.DataFrame({"id": [1.0, float("nan")], "v": [{"a": 1}, {}]})),
        ("json key", pd.DataFrame({"id": pd.Series([{"a": 1}, {"b": 2}], dtype=object), "v": [1, 2]})),
    ]


def _record(frame: pl.DataFrame, kinds: dict[str, str]) -> dict[str, Any]:
    return {
        "kinds": kinds,
        "dtypes": {name: str(dtype) for name, dtype in frame.schema.items()},
        "columns": frame.to_dict(as_series=False),
    }


def _digest(series: pl.Series) -> str:
    """A digest of a String column's values and nulls (JSON text of the list)."""
    return hashlib.sha256(orjson.dumps(series.to_list())).hexdigest()


def _observed() -> dict[str, Any]:
    canon = canonicalize(_every_kind(), key_columns=["id"])
    large, large_kinds = canonical_columns(pd.DataFrame({"v": _large_column()}))
    errors: dict[str, str] = {}
    for label, frame in _bad_inputs():
        try:
            canonicalize(frame, key_columns=["id"])
        except SourceDataError as exc:
            errors[label] = str(exc)
        else:
            errors[label] = "(accepted)"
    return {
        "every_kind": _record(canon.frame, canon.kinds),
        "key_columns": list(canon.key_columns),
        "large": {
            "rows": large.height,
            "kinds": large_kinds,
            "nulls": large.get_column("v").null_count(),
            "sha256": _digest(large.get_column("v")),
        },
        "errors": errors,
    }


@pytest.fixture(scope="module")
def observed() -> dict[str, Any]:
    return _observed()


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return loaded


def test_every_column_kind_converts_as_recorded(observed: dict[str, Any], golden: dict[str, Any]) -> None:
    got, want = observed["every_kind"], golden["every_kind"]
    assert got["kinds"] == want["kinds"]
    assert got["dtypes"] == want["dtypes"]
    for name, values in want["columns"].items():
        assert got["columns"][name] == values, name
    assert list(got["columns"]) == list(want["columns"])
    assert observed["key_columns"] == golden["key_columns"]


def test_a_json_column_larger_than_one_dump_converts_as_recorded(
    observed: dict[str, Any], golden: dict[str, Any]
) -> None:
    assert observed["large"] == golden["large"]
    assert observed["large"]["rows"] == LARGE and observed["large"]["nulls"] > 0


def test_bad_inputs_are_refused_with_the_recorded_messages(observed: dict[str, Any], golden: dict[str, Any]) -> None:
    assert observed["errors"] == golden["errors"]
    assert "(accepted)" not in observed["errors"].values()


def test_a_value_writing_its_own_newline_keeps_its_text() -> None:
    """A value holding an ``orjson.Fragment`` writes it as it is, newlines included: the column is then dumped one
    value at a time, with the same texts."""
    frame = pd.DataFrame(
        {"id": [1, 2, 3], "v": pd.Series([{"a": orjson.Fragment(b"[1,\n2]")}, {"b": 1}, None], dtype=object)}
    )
    canon = canonicalize(frame, key_columns=["id"])
    assert canon.kinds["v"] == "json"
    assert canon.frame.get_column("v").to_list() == ['{"a":[1,\n2]}', '{"b":1}', None]


def main() -> None:
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/test_canonical_golden.py --write  (rewrites the recorded conversion)")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(_observed(), indent=1, ensure_ascii=True, sort_keys=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
