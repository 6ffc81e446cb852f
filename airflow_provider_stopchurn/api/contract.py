"""The fixed contract of StopChurn's ``user`` table, checked before anything is sent (no Airflow import).

Every client has a table ``user`` whose rows carry ``id`` and two objects, ``marketingPreferences`` and
``systemPreferences``, each ``{"email": <bool>, "phone": <bool>}``. A canonical frame (see
:func:`airflow_provider_stopchurn.source.frame.canonicalize`) can satisfy this in two ways, per object:

* dotted columns ``marketingPreferences.email`` and ``marketingPreferences.phone`` of kind ``bool``, which
  :func:`~airflow_provider_stopchurn.encode.records.encode_rows` nests into an object (``nest_dotted_columns=True``);
* one ``json``-kind column ``marketingPreferences`` holding objects with boolean ``email`` and ``phone``.

The check works on the canonical columns, vectorised; only the few example ids of an error are formatted one
by one.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from airflow_provider_stopchurn.exceptions import SourceDataError

__all__ = ["PREFERENCE_FIELDS", "PREFERENCE_OBJECTS", "USER_TABLE", "check_user_table", "coerce_user_flags"]

USER_TABLE = "user"
PREFERENCE_OBJECTS = ("marketingPreferences", "systemPreferences")
PREFERENCE_FIELDS = ("email", "phone")
_MAX_EXAMPLES = 5
_BOOL_TEXTS = ("true", "false")
_PREFERENCE_DTYPE = pl.Struct({field: pl.Boolean for field in PREFERENCE_FIELDS})


def coerce_user_flags(frame: pl.DataFrame, kinds: Mapping[str, str]) -> tuple[pl.DataFrame, dict[str, str]]:
    """Turn 0/1 integer preference columns (``marketingPreferences.email``...) into booleans.

    SQLite has no boolean type and MySQL's BOOLEAN is TINYINT(1): both return 0/1. A dotted preference column of
    kind ``int`` whose values are all 0 or 1 becomes kind ``bool``; any other integer is left for the check to
    refuse.
    """
    kinds = dict(kinds)
    casts = []
    for obj in PREFERENCE_OBJECTS:
        for field in PREFERENCE_FIELDS:
            name = f"{obj}.{field}"
            if kinds.get(name) == "int" and frame[name].drop_nulls().is_in([0, 1]).all():
                casts.append(pl.col(name).cast(pl.Boolean))
                kinds[name] = "bool"
    return (frame.with_columns(casts) if casts else frame), kinds


def check_user_table(frame: pl.DataFrame, kinds: Mapping[str, str], *, nest_dotted_columns: bool = True) -> None:
    """Raise :class:`SourceDataError` unless every row of ``frame`` fits StopChurn's ``user`` table.

    ``frame`` and ``kinds`` are a canonical frame and its column kinds (the rows about to be sent, or the whole
    table); ``nest_dotted_columns`` must be the value given to ``encode_rows``.
    """
    problems: list[str] = []
    bad = pl.repeat(False, frame.height, eager=True, dtype=pl.Boolean)

    if "id" not in frame.columns:
        problems.append("there is no 'id' column")
    elif kinds.get("id") in ("json", "null", "float", "bool"):
        problems.append(f"column 'id' has kind {kinds.get('id')!r}; an id must be a string or an integer")
    else:
        missing_id = frame["id"].is_null()
        bad = _note(problems, bad, missing_id, "have a null 'id'")

    for obj in PREFERENCE_OBJECTS:
        dotted = [f"{obj}.{field}" for field in PREFERENCE_FIELDS]
        if obj in frame.columns:
            bad = _check_json_object(problems, bad, frame, kinds, obj)
        elif nest_dotted_columns and any(name in frame.columns for name in dotted):
            bad = _check_dotted(problems, bad, frame, kinds, obj)
        else:
            forms = f"a JSON column {obj!r} holding objects"
            if nest_dotted_columns:
                forms = f"boolean columns {' and '.join(map(repr, dotted))}, or " + forms
            problems.append(f"{obj!r} is missing: give {forms}")

    if problems:
        raise SourceDataError(_message(problems, frame, bad))


def _note(problems: list[str], bad: pl.Series, failing: pl.Series, what: str) -> pl.Series:
    failing = failing.fill_null(True)
    count = int(failing.sum())
    if count:
        problems.append(f"{count} row(s) {what}")
        return bad | failing
    return bad


def _check_dotted(
    problems: list[str], bad: pl.Series, frame: pl.DataFrame, kinds: Mapping[str, str], obj: str
) -> pl.Series:
    for field in PREFERENCE_FIELDS:
        name = f"{obj}.{field}"
        if name not in frame.columns:
            problems.append(f"column {name!r} is missing")
        elif kinds.get(name) == "null":  # no value at all
            bad = _note(problems, bad, frame[name].is_null(), f"have a null {name!r}")
        elif kinds.get(name) != "bool":
            hint = (
                " (0/1 integers are not booleans: convert them, e.g. astype(bool))"
                if (kinds.get(name) == "int")
                else ""
            )
            problems.append(f"column {name!r} has kind {kinds.get(name)!r}, not 'bool'{hint}")
        else:
            bad = _note(problems, bad, frame[name].is_null(), f"have a null {name!r}")
    return bad


def _check_json_object(
    problems: list[str], bad: pl.Series, frame: pl.DataFrame, kinds: Mapping[str, str], obj: str
) -> pl.Series:
    kind = kinds.get(obj)
    what = f"have a {obj!r} that is not an object with boolean {' and '.join(PREFERENCE_FIELDS)}"
    if kind == "null":  # no value at all
        return _note(problems, bad, frame[obj].is_null(), what)
    if kind != "json":
        hint = (
            " (JSON read as text, e.g. from SQLite, is a string: parse it into objects first)"
            if kind == "string"
            else ""
        )
        problems.append(f"column {obj!r} has kind {kind!r}; it must hold JSON objects{hint}")
        return bad
    texts = frame[obj]
    is_object = texts.str.starts_with("{").fill_null(False)
    valid = is_object
    for field in PREFERENCE_FIELDS:
        valid = valid & texts.str.json_path_match(f"$.{field}").is_in(_BOOL_TEXTS).fill_null(False)
    if bool(valid.any()):
        valid = valid & ~_string_booleans(texts, valid)
    return _note(problems, bad, ~valid, what)


def _string_booleans(texts: pl.Series, candidates: pl.Series) -> pl.Series:
    """Among ``candidates`` (email/phone read as true/false), the rows where one is a *string* "true"/"false".

    ``json_path_match`` unquotes strings, so a strict decode of the candidates tells whether any exist; only
    then are they located in the canonical (compact, orjson-written) text.
    """
    try:
        texts.filter(candidates).str.json_decode(dtype=_PREFERENCE_DTYPE)
    except pl.exceptions.ComputeError:
        pass
    else:
        return pl.repeat(False, texts.len(), eager=True, dtype=pl.Boolean)
    quoted = [f'"{field}":"{value}"' for field in PREFERENCE_FIELDS for value in _BOOL_TEXTS]
    return texts.str.contains_any(quoted).fill_null(False)


def _message(problems: list[str], frame: pl.DataFrame, bad: pl.Series) -> str:
    text = (
        "StopChurn's 'user' table needs, in every row, an 'id' and the objects "
        f"{' and '.join(map(repr, PREFERENCE_OBJECTS))}, each with boolean (non-null) "
        f"{' and '.join(map(repr, PREFERENCE_FIELDS))}. Nothing was sent. Problems: " + "; ".join(problems) + "."
    )
    if "id" in frame.columns and bool(bad.any()):
        examples = frame["id"].filter(bad).head(_MAX_EXAMPLES).to_list()
        text += f" Example row ids: {', '.join(map(repr, examples))}."
    return text
