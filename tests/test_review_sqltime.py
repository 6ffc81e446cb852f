"""Attacks on reading PostgreSQL a batch ahead and converting JSON one distinct text at a time.

Each test pins one behaviour the change must keep: the error a source with invalid JSON text gets is the one of its
first invalid row (as when every row was parsed on its own), whatever order a hash table lists the distinct texts in.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.arrow_values import convert_arrow_column


def json_column(texts: list[str | None]) -> pa.Array:
    """Texts as an ``arrow.json`` column, as the ADBC driver delivers json/jsonb."""
    return pa.ExtensionArray.from_storage(pa.json_(), pa.array(texts, pa.string()))


def test_invalid_json_text_is_reported_for_its_first_row_every_time() -> None:
    # two different invalid texts, repeated (so the column is converted one distinct text at a time); the first
    # row's text is the one a row-by-row read reports, and a failed run must say the same thing on every try
    column = json_column(["[", "{"] * 3 + ["1"] * 6)
    messages = set()
    for _ in range(20):
        with pytest.raises(SourceDataError) as error:
            convert_arrow_column("v", column)
        messages.add(str(error.value))
    assert messages == {"Column 'v' holds text that is not one JSON value: Expecting value: line 1 column 2 (char 1)."}
