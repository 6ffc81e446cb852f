"""One column's values -> canonical values: integers, floats, epoch milliseconds, decimal text, JSON text.

The rules both source paths share (the pandas path of :mod:`~airflow_provider_stopchurn.source.frame` and the Arrow
path of :mod:`~airflow_provider_stopchurn.source.arrow_values`), so equal values get equal canonical forms whatever
carried them; see the kinds table in :mod:`~airflow_provider_stopchurn.source.frame` (no Airflow import).
"""

from __future__ import annotations

import datetime as _dt
import decimal as _decimal
import functools
import json
import uuid as _uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import polars as pl
import pyarrow as pa

from airflow_provider_stopchurn.exceptions import SourceDataError

_MAX_LISTED = 5
_BYTES_TYPES = (bytes, bytearray, memoryview)
_JSON_CONTAINERS = (dict, list, tuple, np.ndarray)
_SECONDS_PER_UNIT = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_MS_PER_DAY = 86_400_000
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
#: Decimal exponents beyond this are written in canonical scientific notation instead of plain digits.
_MAX_PLAIN_EXPONENT = 60
#: The largest magnitude a decimal may have to be sent as a JSON number: the largest double. Parsers that read
#: JSON numbers as doubles (JavaScript's among them) turn anything larger into Infinity.
_MAX_JSON_NUMBER_TEXT = "1.7976931348623157e308"
_MAX_JSON_NUMBER = _decimal.Decimal(_MAX_JSON_NUMBER_TEXT)
#: The same bound as its significant digits and the power of ten of its leading digit (for the vectorised check).
_MAX_JSON_DIGITS, _MAX_JSON_ORDER = "17976931348623157", 308


def listed(values: Sequence[Any]) -> str:
    return _examples(list(values)[:_MAX_LISTED], len(values))


def _examples(shown: Sequence[Any], total: int) -> str:
    """The first values of ``total`` (``shown``, at most ``_MAX_LISTED``), and how many more there are."""
    more = total - len(shown)
    return ", ".join(repr(v) for v in shown) + (f" (and {more} more)" if more > 0 else "")


def _from_arrow(arr: pa.Array | pa.ChunkedArray) -> pl.Series:
    out = pl.from_arrow(arr)
    assert isinstance(out, pl.Series)
    return out


def _int64_array(name: str, arr: pa.Array) -> pa.Array:
    try:
        return arr.cast(pa.int64())
    except pa.ArrowInvalid as exc:
        raise SourceDataError(
            f"Column {name!r} has integers outside the signed 64-bit range; cast it to text or numeric in the source."
        ) from exc


def _float_series(values: np.ndarray) -> pl.Series:
    values = np.array(values, dtype="float64", copy=True)
    values[~np.isfinite(values)] = np.nan
    return pl.Series(values=values, dtype=pl.Float64, nan_to_null=True)


def _epoch_ms(ints: np.ndarray, unit: str, null_mask: np.ndarray) -> pl.Series:
    per_second = _SECONDS_PER_UNIT[unit]
    ms = ints * (1000 // per_second) if per_second <= 1000 else ints // (per_second // 1000)
    return _with_nulls(pl.Series(values=ms, dtype=pl.Int64), null_mask)


def _duration_text(ints: pl.Series, unit: str) -> pl.Series:
    """Durations as integers of ``unit`` (``s``, ``ms``, ``us``, ``ns``; null for missing) -> ISO-8601 text.

    Days are 24 hours; the fraction of a second keeps its significant digits: ``P1DT2H3M4.5S``, ``PT0S``, ``-PT1S``.
    """
    ints = ints.alias("v")
    per_second = _SECONDS_PER_UNIT[unit]
    digits = len(str(per_second)) - 1
    v = pl.col("v")
    a = v.abs()
    total = a // per_second
    frac = a % per_second
    days = total // 86_400
    hours = (total // 3_600) % 24
    minutes = (total // 60) % 60
    seconds = total % 60

    def part(value: pl.Expr, suffix: str) -> pl.Expr:
        return pl.when(value > 0).then(value.cast(pl.String) + suffix).otherwise(pl.lit(""))

    frac_text = (
        pl.when(frac > 0)
        .then("." + frac.cast(pl.String).str.zfill(digits).str.strip_chars_end("0"))
        .otherwise(pl.lit(""))
    )
    sec_part = pl.when((seconds > 0) | (frac > 0)).then(seconds.cast(pl.String) + frac_text + "S")
    time_part = pl.concat_str([part(hours, "H"), part(minutes, "M"), sec_part.otherwise(pl.lit(""))])
    text = pl.concat_str(
        [
            pl.when(v < 0).then(pl.lit("-P")).otherwise(pl.lit("P")),
            part(days, "D"),
            pl.when(time_part != "").then("T" + time_part).when(days == 0).then(pl.lit("T0S")).otherwise(pl.lit("")),
        ]
    )
    return pl.DataFrame([ints]).select(pl.when(v.is_null()).then(None).otherwise(text)).to_series()


def _decimal_text(text: pl.Series) -> pl.Series:
    """Decimal text (``1.50``, ``1E+3``, ``-0.00``, ``0E-30``) -> canonical text; anything else -> null.

    Canonical: no exponent, no trailing fractional zeros, no leading zeros, ``0`` for zero; beyond
    ``_MAX_PLAIN_EXPONENT`` the form ``<digits>E<exp>`` (digits without trailing zeros).
    """
    return _decimal_canonical(text).get_column("t")


def _decimal_text_of(value: _decimal.Decimal) -> str:
    """:func:`_decimal_text` of one finite Decimal, without a polars call (decimals inside JSON values, one by one).

    The same rule: ``value = digits * 10 ** exp10`` with the digits' leading and trailing zeros removed, written
    plainly unless ``|exp10| > _MAX_PLAIN_EXPONENT``.
    """
    sign, digit_tuple, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite: NaN and infinities are refused before
    raw = "".join(map(str, digit_tuple)).lstrip("0")
    digits = raw.rstrip("0")
    if not digits:
        return "0"
    exp10 = exponent + len(raw) - len(digits)
    point = len(digits) + exp10  # digits before the decimal point
    if abs(exp10) > _MAX_PLAIN_EXPONENT:
        body = f"{digits}E{exp10}"
    elif exp10 >= 0:
        body = digits + "0" * exp10
    elif point > 0:
        body = digits[:point] + "." + digits[point:]
    else:
        body = "0." + "0" * -point + digits
    return ("-" if sign else "") + body


def _decimal_column(name: str, text: pl.Series, *, decimal_as_string: bool) -> tuple[pl.Series, str]:
    """Decimal text (null for missing values; ``NaN``/``Infinity`` as such) -> (canonical Series, kind).

    NaN and Infinity are null either way, as for floats. As numbers, decimals must be within +/-
    ``_MAX_JSON_NUMBER``; as strings (``decimal_as_string``) large ones are their exact text.
    """
    canon = _decimal_canonical(text)
    canonical = canon.get_column("t")
    if decimal_as_string:
        return canonical, "string"
    unsendable = canon.get_column("big")
    if unsendable.any():
        bad = text.filter(unsendable).unique(maintain_order=True)
        raise SourceDataError(
            f"Column {name!r} holds decimal value(s) that a JSON number cannot carry: "
            f"{_examples(bad.head(_MAX_LISTED).to_list(), bad.len())}. Decimals are sent as exact JSON numbers, "
            f"which must be within +/-{_MAX_JSON_NUMBER_TEXT} (the largest double; parsers such as "
            "JavaScript's read larger numbers as Infinity). Convert or drop them in the source, or set "
            "decimal_as_string=True to send decimals as strings."
        )
    return canonical, "decimal"


#: Decimal text that is canonical once trailing fractional zeros (and a bare point) are dropped and ``-0`` is
#: ``0``: plain digits without leading zeros, short enough for its exponent to stay within _MAX_PLAIN_EXPONENT
#: and its value far below _MAX_JSON_NUMBER. Databases write decimals so; the general rule is 10x slower.
_PLAIN_DECIMAL = r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?$"
_PLAIN_DECIMAL_MAX_CHARS = _MAX_PLAIN_EXPONENT


def _decimal_canonical(text: pl.Series) -> pl.DataFrame:
    """:func:`_decimal_text` as column ``t``, and whether the value is beyond +/- ``_MAX_JSON_NUMBER`` as ``big``."""
    t = pl.col("t")
    plain = (t.str.contains(_PLAIN_DECIMAL) & (t.str.len_bytes() <= _PLAIN_DECIMAL_MAX_CHARS)).fill_null(True)
    stripped = pl.when(t.str.contains(".", literal=True)).then(t.str.strip_chars_end("0").str.strip_chars_end("."))
    fast = pl.DataFrame([text.alias("t")]).select(
        pl.when(stripped.otherwise(t) == "-0").then(pl.lit("0")).otherwise(stripped.otherwise(t)).alias("t"),
        pl.lit(False).alias("big"),
        plain.alias("plain"),
    )
    others = np.flatnonzero(~fast.get_column("plain").to_numpy())
    fast = fast.drop("plain")
    if len(others) == 0:
        return fast
    general = _decimal_canonical_general(text.gather(others))
    return fast.with_columns(
        fast.get_column("t").scatter(others, general.get_column("t")),
        fast.get_column("big").scatter(others, general.get_column("big")),
    )


def _decimal_canonical_general(text: pl.Series) -> pl.DataFrame:
    """:func:`_decimal_canonical` for any decimal text (signs, leading zeros, exponents, NaN)."""
    pattern = r"^([+-]?)([0-9]*)(?:\.([0-9]*))?(?:[eE]([+-]?[0-9]+))?$"
    frame = pl.DataFrame([text.alias("t")]).select(
        pl.col("t").str.extract_groups(pattern).alias("g"), pl.col("t").str.contains(pattern).alias("ok")
    )
    g = pl.col("g").struct
    sign, int_part, frac_part = g.field("1"), g.field("2").fill_null(""), g.field("3").fill_null("")
    exp = g.field("4").cast(pl.Int64).fill_null(0)
    digits_raw = (int_part + frac_part).str.strip_chars_start("0")
    digits = digits_raw.str.strip_chars_end("0")
    # value = digits * 10 ** exp10
    exp10 = (
        exp
        - frac_part.str.len_chars().cast(pl.Int64)
        + (digits_raw.str.len_chars().cast(pl.Int64) - digits.str.len_chars().cast(pl.Int64))
    )
    n = digits.str.len_chars().cast(pl.Int64)
    point = n + exp10  # digits before the decimal point
    zeros = pl.lit("0" * _MAX_PLAIN_EXPONENT * 2)
    magnitude = (
        pl.when(exp10 >= 0)
        .then(digits + zeros.str.slice(0, exp10))
        .when(point > 0)
        .then(digits.str.slice(0, point) + "." + digits.str.slice(point))
        .otherwise("0." + zeros.str.slice(0, -point) + digits)
    )
    scientific = digits + "E" + exp10.cast(pl.String)
    body = pl.when(exp10.abs() > _MAX_PLAIN_EXPONENT).then(scientific).otherwise(magnitude)
    valid = pl.col("ok").fill_null(False) & (int_part + frac_part).str.contains(r"[0-9]")
    order = point - 1  # the power of ten of the leading digit
    big = (digits != "") & (
        (order > _MAX_JSON_ORDER) | ((order == _MAX_JSON_ORDER) & (digits > pl.lit(_MAX_JSON_DIGITS)))
    )
    return frame.select(
        pl.when(~valid)
        .then(None)
        .when(digits == "")
        .then(pl.lit("0"))
        .otherwise(pl.when(sign == "-").then(pl.lit("-")).otherwise(pl.lit("")) + body)
        .alias("t"),
        (valid & big).fill_null(False).alias("big"),
    )


def _with_nulls(s: pl.Series, null_mask: np.ndarray) -> pl.Series:
    return s.set(pl.Series(null_mask, dtype=pl.Boolean), None) if null_mask.any() else s


def _raise_bytes(name: str) -> None:
    raise SourceDataError(
        f"Column {name!r} holds binary values (bytes), which JSON cannot carry; convert them in the source "
        f"query, e.g. encode({name}, 'base64') or CAST({name} AS TEXT)."
    )


class _UnsendableError(ValueError):
    """A value inside a JSON value that cannot be sent; the message completes "Column 'x' holds ..."."""


def _json_default(value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return (value - _EPOCH) // _dt.timedelta(milliseconds=1)
    if isinstance(value, _dt.date):
        return (value - _dt.date(1970, 1, 1)).days * _MS_PER_DAY
    if isinstance(value, _dt.time):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return _duration_text(pl.Series([value // _dt.timedelta(microseconds=1)], dtype=pl.Int64), "us").item()
    if isinstance(value, _decimal.Decimal):
        if not value.is_finite() or abs(value) > _MAX_JSON_NUMBER:
            raise _UnsendableError(
                f"a decimal {str(value)!r} inside a JSON value, which a JSON number cannot carry: decimals inside "
                f"JSON values are sent as numbers, which must be within +/-{_MAX_JSON_NUMBER_TEXT} "
                "(the largest double)"
            )
        return orjson.Fragment(_decimal_text_of(value))
    if isinstance(value, np.ndarray):  # the arrays orjson does not write itself (object dtype, non-contiguous, ...)
        return list(value) if value.dtype.kind in "mM" else value.tolist()
    if isinstance(value, _uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if isinstance(value, _BYTES_TYPES):
        raise TypeError("binary value (bytes)")
    raise TypeError(f"unsupported type {type(value).__qualname__}")


#: Dict keys must be strings; a dump with :data:`_JSON_OPTIONS_ANY_KEYS` also writes other keys as text (``1`` ->
#: ``"1"``, ``True`` -> ``"true"``), and the keys are sorted as text (the same order for string keys).
_JSON_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_SERIALIZE_NUMPY
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
_JSON_OPTIONS_ANY_KEYS = _JSON_OPTIONS | orjson.OPT_NON_STR_KEYS


def _json_series(name: str, values: np.ndarray, mask: np.ndarray) -> pl.Series:
    """Canonical JSON text of each value of ``values``, null where ``mask``."""
    missing = bool(mask.any())
    try:
        present = _dump_each(values[~mask] if missing else values, name)
    except (orjson.JSONEncodeError, TypeError) as exc:
        if isinstance(exc.__cause__, _UnsendableError):
            raise SourceDataError(f"Column {name!r} holds {exc.__cause__}. Convert it in the source.") from exc
        if "bytes" in str(exc):
            _raise_bytes(name)
        raise SourceDataError(
            f"Column {name!r} holds a value that cannot be written as JSON: {exc}. Convert it in the source."
        ) from exc
    if not missing:
        return present
    full = pl.repeat(None, len(values), dtype=pl.String, eager=True)
    return full.scatter(np.flatnonzero(~mask), present)


_JSON_BATCH = 250_000
#: Written between the values of one dump (as it is: a fragment). orjson's compact output holds no raw newline of
#: its own (JSON escapes control characters inside strings), so each newline of the dump ends a value.
_SEPARATOR = orjson.Fragment(b"\n")
_NEWLINE = ord("\n")
_SEPARATOR_TEXT = ",\n,"


def _dump_each(values: np.ndarray, name: str) -> pl.Series:
    """Canonical JSON text of each value, with one orjson call for the whole column.

    The values are dumped as one JSON array with a newline between them, and the array's text is cut at the
    newlines into the column's strings with numpy offsets (no Python object per value). If a value wrote a newline
    itself (an ``orjson.Fragment`` inside it), fall back to one call per value.

    Dicts with keys that are not strings (``{1: "a"}``) make the dump fail; the column is then dumped again
    writing such keys as text, and refused if two keys of one dict became the same text (see
    :func:`_check_key_collisions`).
    """
    if len(values) > _JSON_BATCH:  # bound the transient copies (values list, JSON text, offsets) to one batch
        return pl.concat([_dump_each(values[i : i + _JSON_BATCH], name) for i in range(0, len(values), _JSON_BATCH)])
    n = len(values)
    if n == 0:
        return pl.Series(values=[], dtype=pl.String)
    items: list[Any] = [_SEPARATOR] * (2 * n - 1)
    items[::2] = values.tolist()
    option = _JSON_OPTIONS
    try:
        whole = orjson.dumps(items, default=_json_default, option=option)
    except orjson.JSONEncodeError:  # a key that is not a string (or a value that fails again below)
        option = _JSON_OPTIONS_ANY_KEYS
        whole = orjson.dumps(items, default=_json_default, option=option)
    del items
    texts = _cut_at_separators(whole, n)
    if texts is None:  # a value wrote a newline of its own
        dumps = functools.partial(orjson.dumps, default=_json_default, option=option)
        texts = pl.Series(values=list(map(dumps, values)), dtype=pl.Binary).cast(pl.String)
    if option == _JSON_OPTIONS_ANY_KEYS:
        _check_key_collisions(name, values.tolist(), texts.to_list())
    return texts


def _cut_at_separators(whole: bytes, n: int) -> pl.Series | None:
    """The ``n`` values of ``whole`` (``[v0,\\n,v1,\\n,...]``, see :func:`_dump_each`) as a String Series, or
    None when ``whole`` holds another count of newlines.

    Arrow reads the values in place from the dump's buffer, each with the ``,\\n,`` that follows it, at offsets
    computed from the newlines' positions; polars then strips that suffix. With exactly ``n - 1`` newlines, every
    newline is a separator, so only a separator ends a value so.
    """
    text = np.frombuffer(whole, dtype=np.uint8)
    newlines = np.flatnonzero(text == _NEWLINE)
    if newlines.size != n - 1:
        return None
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0], offsets[-1] = 1, text.size - 1  # inside the array's brackets
    offsets[1:-1] = newlines + 2  # value k + 1 starts after newline k and its comma
    array = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(whole))
    return _from_arrow(array).str.strip_suffix(_SEPARATOR_TEXT)


def _check_key_collisions(name: str, values: Sequence[Any], parts: Sequence[str]) -> None:
    """Refuse values whose dicts hold two keys written as the same JSON key (``1`` and ``"1"``).

    Only the values that cannot be dumped with string keys alone hold other keys; their JSON texts are read back
    to find keys written twice in one object.
    """
    strict = functools.partial(orjson.dumps, default=_json_default, option=_JSON_OPTIONS)
    collided: dict[str, None] = {}
    count = 0
    for value, part in zip(values, parts, strict=True):
        if not isinstance(value, _JSON_CONTAINERS):
            continue
        try:
            strict(value)
        except orjson.JSONEncodeError:
            repeated = _repeated_keys(part)
            if repeated:
                count += 1
                collided.update(dict.fromkeys(repeated))
    if count:
        raise SourceDataError(
            f"Column {name!r} holds {count} value(s) with objects whose keys collide once written as JSON keys, "
            f"which are text: {listed(list(collided))} (e.g. the keys 1 and '1' both become \"1\", True and "
            "'true' both become \"true\"). A JSON object cannot hold a key twice: make the keys distinct (e.g. all "
            "strings) in the source."
        )


def _repeated_keys(text: str) -> list[str]:
    """The keys written more than once in one object of the JSON ``text``."""
    repeated: list[str] = []

    def check(pairs: list[tuple[str, Any]]) -> None:
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                repeated.append(key)
            seen.add(key)

    json.loads(text, object_pairs_hook=check)
    return repeated
