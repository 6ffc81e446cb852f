"""diff_frames: unit cases and a property test against a dict-based oracle."""

from __future__ import annotations

import math
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_stopchurn.update.diff import ChangeSet, diff_frames


def keys_of(frame: pl.DataFrame, keys: list[str]) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in frame.select(keys).rows()]


def test_base_none_inserts_everything_sorted() -> None:
    new = pl.DataFrame({"id": [3, 1, 2], "v": ["c", "a", "b"]})
    cs = diff_frames(None, new, ["id"])
    assert cs.inserted.to_dict(as_series=False) == {"id": [1, 2, 3], "v": ["a", "b", "c"]}
    assert cs.updated.height == cs.deleted.height == cs.unchanged == 0
    assert cs.updated.schema == new.schema


def test_empty_base_inserts_everything() -> None:
    new = pl.DataFrame({"id": [1], "v": [1.5]})
    cs = diff_frames(new.clear(), new, ["id"])
    assert cs.inserted.equals(new)
    assert cs.changed == 1


def test_empty_new_deletes_everything() -> None:
    base = pl.DataFrame({"id": [2, 1], "v": [None, 1]})
    cs = diff_frames(base, base.clear(), ["id"])
    assert cs.deleted.to_dict(as_series=False) == {"id": [1, 2], "v": [1, None]}
    assert cs.inserted.height == cs.updated.height == cs.unchanged == 0


def test_inserted_updated_deleted_unchanged() -> None:
    base = pl.DataFrame({"id": [1, 2, 3, 4], "v": [1.0, None, 3.0, float("nan")], "s": ["a", "b", None, "d"]})
    new = pl.DataFrame(
        {"s": ["a", "B", "d", "e", None], "id": [1, 2, 4, 5, 3], "v": [1.0, None, float("nan"), 5.0, 3.0]}
    )
    cs = diff_frames(base, new, ["id"])
    assert keys_of(cs.inserted, ["id"]) == [(5,)]
    assert keys_of(cs.updated, ["id"]) == [(2,)]  # 'b' -> 'B'; id 3 and 4 are equal (null == null, NaN == NaN)
    assert keys_of(cs.deleted, ["id"]) == []
    assert cs.unchanged == 3
    assert cs.updated.columns == new.columns  # column order of the source frame
    assert cs.updated.row(0, named=True) == {"s": "B", "id": 2, "v": None}


def test_deleted_rows_are_the_base_rows() -> None:
    base = pl.DataFrame({"id": [1, 2], "v": ["old1", "old2"], "w": [1, 2]})
    new = pl.DataFrame({"id": [2], "v": ["old2"], "w": [2]})
    cs = diff_frames(base, new, ["id"])
    assert cs.deleted.to_dict(as_series=False) == {"id": [1], "v": ["old1"], "w": [1]}
    assert cs.unchanged == 1


def test_null_vs_value_is_a_change() -> None:
    base = pl.DataFrame({"id": [1, 2], "v": [None, 1]})
    new = pl.DataFrame({"id": [1, 2], "v": [1, None]})
    assert keys_of(diff_frames(base, new, ["id"]).updated, ["id"]) == [(1,), (2,)]


def test_int_vs_float_compares_numerically() -> None:
    base = pl.DataFrame({"id": [1, 2, 3], "v": [3, None, 5]}, schema={"id": pl.Int64, "v": pl.Int64})
    new = pl.DataFrame({"id": [1, 2, 3], "v": [3.0, None, 5.5]})
    cs = diff_frames(base, new, ["id"])
    assert keys_of(cs.updated, ["id"]) == [(3,)]
    assert cs.updated.schema == new.schema
    assert cs.unchanged == 2


def test_float_key_on_one_side() -> None:
    base = pl.DataFrame({"id": [1, 2], "v": ["a", "b"]})
    new = pl.DataFrame({"id": [2.0, 3.0], "v": ["b", "c"]})
    cs = diff_frames(base, new, ["id"])
    assert cs.inserted["id"].to_list() == [3.0]
    assert cs.deleted["id"].to_list() == [1]
    assert cs.deleted.schema == base.schema
    assert cs.unchanged == 1


def test_composite_key() -> None:
    base = pl.DataFrame({"a": [1, 1, 2], "b": ["x", "y", "x"], "v": [1, 2, 3]})
    new = pl.DataFrame({"a": [1, 2, 2], "b": ["y", "x", "y"], "v": [20, 3, 4]})
    cs = diff_frames(base, new, ["a", "b"])
    assert keys_of(cs.inserted, ["a", "b"]) == [(2, "y")]
    assert keys_of(cs.updated, ["a", "b"]) == [(1, "y")]
    assert keys_of(cs.deleted, ["a", "b"]) == [(1, "x")]
    assert cs.unchanged == 1


def test_exact_comparison_of_big_ints_and_long_strings() -> None:
    base = pl.DataFrame({"id": [1, 2], "big": [2**62, 5], "s": ["x" * 10_000, "y"]})
    new = pl.DataFrame({"id": [1, 2], "big": [2**62 + 1, 5], "s": ["x" * 10_000, "y" * 2]})
    assert keys_of(diff_frames(base, new, ["id"]).updated, ["id"]) == [(1,), (2,)]


def test_key_only_frames() -> None:
    base = pl.DataFrame({"id": [1, 2]})
    new = pl.DataFrame({"id": [2, 3]})
    cs = diff_frames(base, new, ["id"])
    assert (cs.inserted["id"].to_list(), cs.deleted["id"].to_list(), cs.updated.height, cs.unchanged) == (
        [3],
        [1],
        0,
        1,
    )


def test_missing_key_column_raises() -> None:
    with pytest.raises(ValueError, match="missing"):
        diff_frames(None, pl.DataFrame({"v": [1]}), ["id"])


# --- property test against an oracle ---------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def oracle(base: list[dict[str, Any]], new: list[dict[str, Any]], keys: list[str]) -> tuple[set, set, set, int]:
    def index(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
        return {tuple(float(r[k]) if isinstance(r[k], float) else r[k] for k in keys): r for r in rows}

    b, n = index(base), index(new)
    inserted = set(n) - set(b)
    deleted = set(b) - set(n)
    updated = {k for k in set(n) & set(b) if any(not _same(n[k][c], b[k][c]) for c in n[k])}
    return inserted, updated, deleted, len(set(n) & set(b)) - len(updated)


values_i = st.one_of(st.none(), st.integers(-3, 3))
values_f = st.one_of(st.none(), st.just(float("nan")), st.sampled_from([0.0, 1.0, 1.5, -2.0]))
values_s = st.one_of(st.none(), st.sampled_from(["", "a", "b", "é"]))


@st.composite
def frame_pair(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], bool]:
    composite = draw(st.booleans())
    keys = ["k1", "k2"] if composite else ["k1"]
    key_space = [(a, b) for a in range(4) for b in ("x", "y")] if composite else [(a, None) for a in range(8)]

    def rows() -> list[dict[str, Any]]:
        chosen = draw(st.lists(st.sampled_from(key_space), unique=True, max_size=len(key_space)))
        out = []
        for a, b in chosen:
            row: dict[str, Any] = {"k1": a}
            if composite:
                row["k2"] = b
            row["i"] = draw(values_i)
            row["f"] = draw(values_f)
            row["s"] = draw(values_s)
            out.append(row)
        return out

    base, new = rows(), rows()
    if draw(st.booleans()) and base:
        # an unchanged copy of some base rows, to exercise "unchanged"
        new = {tuple(r[k] for k in keys): r for r in new} | {
            tuple(r[k] for k in keys): dict(r) for r in base[: draw(st.integers(0, len(base)))]
        }
        new = list(new.values())
    int_as_float = draw(st.booleans())  # pandas turned the int column into floats on one side
    return base, new, keys, int_as_float


def to_frame(rows: list[dict[str, Any]], keys: list[str], *, int_as_float: bool) -> pl.DataFrame:
    schema: dict[str, Any] = {"k1": pl.Int64}
    if "k2" in keys:
        schema["k2"] = pl.String
    schema |= {"i": pl.Float64 if int_as_float else pl.Int64, "f": pl.Float64, "s": pl.String}
    data = {c: [r[c] for r in rows] for c in schema}
    if int_as_float:
        data["i"] = [None if v is None else float(v) for v in data["i"]]
    return pl.DataFrame(data, schema=schema, strict=False)


@settings(max_examples=300, deadline=None)
@given(frame_pair(), st.booleans())
def test_diff_matches_oracle(pair: tuple[list, list, list[str], bool], float_on_new_side: bool) -> None:
    base_rows, new_rows, keys, int_as_float = pair
    base = to_frame(base_rows, keys, int_as_float=int_as_float and not float_on_new_side)
    new = to_frame(new_rows, keys, int_as_float=int_as_float and float_on_new_side)
    cs: ChangeSet = diff_frames(base, new, keys)
    inserted, updated, deleted, unchanged = oracle(base_rows, new_rows, keys)
    assert set(keys_of(cs.inserted, keys)) == inserted
    assert set(keys_of(cs.updated, keys)) == updated
    assert set(keys_of(cs.deleted, keys)) == deleted
    assert cs.unchanged == unchanged
    for frame, source in ((cs.inserted, new), (cs.updated, new), (cs.deleted, base)):
        assert frame.schema == source.schema
        assert keys_of(frame, keys) == sorted(keys_of(frame, keys))
