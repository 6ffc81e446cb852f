"""The state table's rows kept as values (``warehouse/rows.py``) where the bookkeeping row's text could be read
back differently from how it was written, or read by a version that does not know the representation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pushdown_engines import Engine, local_engine  # noqa: F401 - the engine fixture
from test_pushdown_state_rows import _ROWS, STATE, _deletes_match_the_rows_delivered, _World


@pytest.mark.postgres
def test_a_database_without_standard_conforming_strings_keeps_the_layouts_exact(
    postgres_database: Any, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """``standard_conforming_strings = off`` (a database or role setting): a backslash in a plain string literal
    is an escape. The layouts' text is full of them (``{\\"id\\":``): written as a literal, it must still be read
    back as written, or a delete sends a row rebuilt from other texts (or no run can read the bookkeeping)."""
    engine = Engine("postgres", postgres_database)
    engine.execute(_ROWS["postgres"])
    engine.execute(f'ALTER DATABASE "{postgres_database.dbname}" SET standard_conforming_strings = off')
    world = _World(engine, stopchurn_sandbox_factory(record=True), tmp_path)
    assert world.run().inserted == 3
    engine.execute("DELETE FROM src")
    assert world.run().deleted == 3
    assert _deletes_match_the_rows_delivered(world) == 3


def test_a_state_table_with_rows_kept_as_values_names_a_format_older_versions_refuse(engine: Engine, world: Any) -> None:
    """A version before the layouts reads every row as its JSON text, so it would send a delete whose row is a
    row's values and separators. It refuses a bookkeeping row whose format is above the 2 it reads: rows kept as
    values must be marked so (rows kept as JSON text, e.g. for a role that may not add the column, need not)."""
    assert world.run().inserted == 3
    assert any(not r.startswith("{") for r in world.kept())
    ((fmt,),) = engine.rows(f'SELECT "format" FROM {STATE}__meta')
    assert int(fmt) > 2


@pytest.fixture
def world(engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path) -> _World:
    engine.execute(_ROWS[engine.name])
    return _World(engine, stopchurn_sandbox_factory(record=True), tmp_path)
