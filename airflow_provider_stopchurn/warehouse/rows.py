"""The last delivered row as the state table keeps it: its values alone, the constant text around them kept once.

A delete carries the whole row exactly as it was delivered, so the state table keeps every row's JSON text. Most of
that text is the same in every row: the keys (``{"id":``, ``,"name":``, ...), nesting and braces. A row's JSON is
``L0 v0 L1 v1 ... Ln`` where the ``L`` texts (the *layout*) depend only on the columns, and ``v`` are the values'
JSON texts. The state table keeps ``<tag> RS v0 US v1 US ...`` (``RS``/``US``: the ASCII record and unit
separators, which JSON text never holds raw: they are escaped inside strings and not allowed outside them), and
its bookkeeping row keeps each layout once under its tag (:func:`layouts_text`).

Both directions are exact by construction: :func:`compact` cuts a row at the first occurrence of each ``L`` in
turn and :func:`expand` joins the pieces with the same ``L`` texts, so a row comes back byte for byte whatever its
values hold (a nested JSON value that contains a later key's text is cut at the wrong place and joined back at the
same place). A row that does not fit the layout (another column set, a separator inside) is kept as its JSON text,
which starts with ``{`` and is read as it is; so are the rows of state tables written before this representation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from airflow_provider_stopchurn.encode.records import _build_tree, _key_text
from airflow_provider_stopchurn.exceptions import SnapshotError

__all__ = ["RowLayout", "compact", "expand", "holes", "kept_values", "layout", "layouts_of", "layouts_text", "tag_of"]

RS, US = "\x1e", "\x1f"
_SEPARATORS = "[\x1e\x1f]"


@dataclass(frozen=True)
class RowLayout:
    """How a plan's rows are kept in the state table: the constant texts of its rows' JSON, their tag, and every
    layout the bookkeeping row keeps with it."""

    texts: list[str]
    tag: str
    layouts: dict[str, list[str]]


def layout(columns: Sequence[str], *, nest_dotted_columns: bool) -> list[str]:
    """The constant texts of the row JSON of ``columns`` (in the frame's order): one more than the values, as
    :func:`~airflow_provider_stopchurn.encode.records.encode_rows` writes around them."""
    return _walk(columns, nest_dotted_columns)[0]


def holes(columns: Sequence[str], *, nest_dotted_columns: bool) -> list[str]:
    """The columns whose values go between the texts of :func:`layout`, in order."""
    return _walk(columns, nest_dotted_columns)[1]


def _walk(columns: Sequence[str], nest: bool) -> tuple[list[str], list[str]]:
    tree = _build_tree(list(columns), nest)
    texts, names = ["{"], []

    def walk(node: Mapping[str, Any]) -> None:
        for i, (key, sub) in enumerate(node.items()):
            texts[-1] += ("," if i else "") + _key_text(key) + ":"
            if isinstance(sub, str):
                names.append(sub)
                texts.append("")
            else:
                texts[-1] += "{"
                walk(sub)
                texts[-1] += "}"

    walk(tree)
    texts[-1] += "}"
    return texts, names


def tag_of(texts: Sequence[str], taken: Mapping[str, Sequence[str]] | None = None) -> str:
    """A layout's tag: the shortest prefix (4 hex digits or more) of its digest that no other layout in ``taken``
    has. Derived from the layout, so a row never names a layout it was not cut by."""
    digest = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
    taken = taken or {}
    for size in range(4, len(digest) + 1):
        tag = digest[:size]
        if list(taken.get(tag, texts)) == list(texts):
            return tag
    return digest  # never reached: two different layouts with one sha256


def compact(rows: pl.Series, texts: Sequence[str], tag: str) -> pl.Series:
    """Each row JSON of ``rows`` as the state table keeps it (see the module docstring); a row that does not fit
    ``texts`` stays as it is."""
    if len(texts) < 2:  # no values: nothing to leave out
        return rows
    first, last = texts[0], texts[-1]
    frame = pl.DataFrame({"row": rows.cast(pl.String)})
    fits = (
        pl.col("row").str.starts_with(first)
        & pl.col("row").str.ends_with(last)
        & (pl.col("row").str.len_chars() >= len(first) + len(last))
        & ~pl.col("row").str.contains(_SEPARATORS)
    )
    rest = pl.col("row").str.slice(len(first), pl.col("row").str.len_chars() - len(first) - len(last))
    if len(texts) == 2:  # one value: all of the middle
        pieces = [rest]
    else:
        frame = frame.with_columns(rest.alias("__rest"))
        pieces = []
        for i, text in enumerate(texts[1:-1]):
            cut = pl.col("__rest").str.splitn(text, 2)
            frame = frame.with_columns(
                cut.struct.field("field_0").alias(f"__v{i}"), cut.struct.field("field_1").alias("__rest")
            )
            pieces.append(pl.col(f"__v{i}"))
        pieces.append(pl.col("__rest"))
    fits = fits & pl.all_horizontal([p.is_not_null() for p in pieces])
    kept = pl.concat_str([pl.lit(tag + RS), pl.concat_str(pieces, separator=US)])
    out = frame.select(pl.when(fits).then(kept).otherwise(pl.col("row")).alias(rows.name))
    return out.to_series()


def kept_values(values: Sequence[pl.Expr], tag: str) -> pl.Expr:
    """The state table's text of each row from its values' JSON texts (in :func:`holes` order): what
    :func:`compact` makes of the row they are written into, without writing it."""
    return pl.concat_str([pl.lit(tag + RS), pl.concat_str(list(values), separator=US)])


def expand(stored: pl.Series, layouts: Mapping[str, Sequence[str]]) -> pl.Series:
    """The row JSON of each stored row (:func:`compact`'s inverse); rows kept as JSON text are returned as
    they are. :class:`SnapshotError` when a row names a layout the bookkeeping does not hold."""
    frame = pl.DataFrame({"row": stored.cast(pl.String)})
    cut = pl.col("row").str.splitn(RS, 2)
    # a row kept as values starts with its tag and RS; a JSON text starts with "{" (and should never hold RS)
    tagged = cut.struct.field("field_1").is_not_null() & cut.struct.field("field_0").str.contains("^[0-9a-f]{4,64}$")
    frame = frame.with_columns(
        pl.when(tagged).then(cut.struct.field("field_0")).alias("__tag"), cut.struct.field("field_1").alias("__v")
    )
    tags = [t for t in frame.get_column("__tag").drop_nulls().unique().to_list()]
    unknown = [t for t in tags if t not in layouts]
    if unknown:
        raise SnapshotError(
            f"The state table holds rows of layout(s) {sorted(unknown)} its bookkeeping does not describe; nothing "
            "was sent.\nRepair it with `stopchurn reconcile --reset` and a run with initial_load='baseline' (docs: "
            "the diff in the warehouse)."
        )
    out = pl.col("row")
    for t in tags:
        texts = layouts[t]
        n = len(texts) - 1
        fields = pl.col("__v").str.split_exact(US, max(n - 1, 0))
        pieces: list[pl.Expr] = [pl.lit(texts[0])]
        for i, text in enumerate(texts[1:]):
            pieces += [fields.struct.field(f"field_{i}"), pl.lit(text)]
        count = pl.col("__v").str.count_matches(US, literal=True) == n - 1
        out = pl.when(pl.col("__tag") == t).then(pl.when(count).then(pl.concat_str(pieces))).otherwise(out)
    rebuilt = frame.select(out.alias(stored.name)).to_series()
    broken = rebuilt.is_null() & stored.is_not_null()
    if broken.any():
        raise SnapshotError(
            f"{int(broken.sum())} row(s) of the state table do not match their layout; nothing was sent.\n"
            "Repair it with `stopchurn reconcile --reset` and a run with initial_load='baseline' (docs: the diff in "
            "the warehouse)."
        )
    return rebuilt


def layouts_of(text: str | None) -> dict[str, list[str]]:
    """The layouts the bookkeeping row keeps (tag -> constant texts)."""
    return {str(k): [str(t) for t in v] for k, v in json.loads(text).items()} if text else {}


def layouts_text(layouts: Mapping[str, Sequence[str]]) -> str:
    return json.dumps({k: list(v) for k, v in sorted(layouts.items())}, ensure_ascii=False, separators=(",", ":"))
