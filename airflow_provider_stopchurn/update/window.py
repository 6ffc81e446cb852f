"""A window of a plan: consecutive encoded updates and the chunks they are cut into, what a delivery sends at once.

The planner (``plan.py``) and the warehouse diff encode a plan window by window; ``deliver.py`` sends one window's
chunks before it takes the next, so only one window of update JSON is held at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import polars as pl


@dataclass(frozen=True)
class Window:
    """Consecutive updates of a plan: ``updates[i]`` is update ``offset + i``; ``chunks`` in plan positions.

    ``bytes``: the bytes of the chunks' request bodies.
    """

    offset: int
    updates: pl.Series
    chunks: list[tuple[int, int]]
    bytes: int


class Rows(Protocol):
    """Rows a plan encodes a slice at a time: a change frame, or a snapshot file read by row group."""

    @property
    def height(self) -> int: ...

    def slice(self, offset: int, length: int | None = None) -> pl.DataFrame: ...


__all__ = ["Rows", "Window"]
