"""Text columns holding JSON (``json_columns``): parsed into canonical JSON after canonicalization, for every kind
of source (no Airflow import)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson
import polars as pl

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.arrow_values import json_number, json_text_column
from airflow_provider_stopchurn.source.frame import Canonical

__all__ = ["parse_json_columns"]

#: Keys of the rows with invalid JSON named in the error.
_BAD_JSON_KEYS_SHOWN = 5


def parse_json_columns(canon: Canonical, columns: Sequence[str], *, keys_may_be_json: bool = False) -> Canonical:
    """``canon`` with the text columns named in ``columns`` parsed as JSON: kind ``json``, canonical JSON text.

    For every kind of source (the same canonical frame follows from pandas, polars and Arrow), after
    canonicalization: a column of kind ``string`` is parsed (numbers kept exact, keys sorted, so reformatted JSON
    text is no change); a column that is JSON already (PostgreSQL json/jsonb, MySQL 8's JSON) or holds only NULLs
    is left as it is. Raises :class:`SourceDataError` for a column the source does not have, a key column (unless
    ``keys_may_be_json``: events, whose key is the whole event), a column of another kind, or text that is not one
    JSON value (naming the column and the ``key_columns`` of up to five rows).
    """
    if not columns:
        return canon
    kinds = dict(canon.kinds)
    replaced: list[pl.Series] = []
    for name in dict.fromkeys(columns):
        kind = kinds.get(name)
        if kind is None:
            raise SourceDataError(
                f"json_columns names {name!r}, which the source does not have (its columns: "
                f"{', '.join(map(repr, canon.frame.columns))})."
            )
        if name in canon.key_columns and not keys_may_be_json:
            raise SourceDataError(f"json_columns names the key column {name!r}; a key cannot be a JSON value.")
        if kind in ("json", "null"):
            continue
        if kind != "string":
            raise SourceDataError(
                f"json_columns names {name!r}, whose values are of kind {kind!r}, not text holding JSON; leave it "
                "out of json_columns or cast it to text in the source."
            )
        texts = canon.frame.get_column(name)
        _check_json_texts(canon, name, texts)
        parsed = json_text_column(name, texts.to_arrow())
        replaced.append(parsed.alias(name))
        kinds[name] = "json"
    if not replaced:
        return canon
    return Canonical(frame=canon.frame.with_columns(replaced), kinds=kinds, key_columns=canon.key_columns)


def _check_json_texts(canon: Canonical, name: str, texts: pl.Series) -> None:
    """Raise :class:`SourceDataError` naming ``name`` and up to five keys when any text is not one JSON value."""
    present = texts.drop_nulls()
    joined = "[" + (present.str.join(",").item() or "") + "]" if present.len() else "[]"
    try:
        if len(orjson.loads(joined)) == present.len():
            return
    except orjson.JSONDecodeError:
        pass
    bad = [row for row, text in enumerate(texts.to_list()) if text is not None and not _is_json(text)]
    if not bad:
        return
    keys = canon.frame.select(canon.key_columns)[bad[:_BAD_JSON_KEYS_SHOWN]]
    shown = [row[0] if len(row) == 1 else row for row in keys.rows()]
    more = f" (and {len(bad) - len(shown)} more)" if len(bad) > len(shown) else ""
    raise SourceDataError(
        f"Column {name!r} is in json_columns, but {len(bad)} row(s) hold text that is not valid JSON; keys "
        f"({', '.join(canon.key_columns)}) {', '.join(map(repr, shown))}{more}. Nothing was sent."
    )


def _is_json(text: str) -> bool:
    """Whether ``text`` is one JSON value (numbers beyond a double's range too, as json/jsonb hold them; not NaN)."""
    try:
        orjson.loads(text)
        return True
    except orjson.JSONDecodeError:
        pass
    try:  # what orjson refuses but the exact parser reads: numbers such as 1e400
        json.loads(text, parse_float=json_number, parse_constant=_no_constant)
        return True
    except ValueError:
        return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
