"""What both storage backends share: relative names, printable locations, their errors, and a file written aside.

No I/O of its own; :mod:`.backend` describes the backends and picks one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from airflow_provider_stopchurn.exceptions import SnapshotError

if TYPE_CHECKING:
    import polars as pl

__all__ = ["StagedFile", "StagingBackend", "display_location", "name_parts", "read_error", "write_error"]


def display_location(path: object) -> str:
    """A printable location without credentials (URL user info is dropped)."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1", str(path))


def name_parts(name: str) -> list[str]:
    """The segments of a relative ``/``-separated name (none empty, ``.`` or ``..``)."""
    parts = name.split("/") if name else []
    if any(p in {"", ".", ".."} for p in parts):
        raise ValueError(f"Not a relative file name: {name!r}")
    return parts


def write_error(location: str, err: BaseException) -> SnapshotError:
    return SnapshotError(
        f"Cannot write {location}: {err.__class__.__name__}: {err}. "
        "Check that the snapshot location exists and is writable."
    )


def read_error(location: str, err: BaseException) -> SnapshotError:
    return SnapshotError(f"Cannot read {location}: {err.__class__.__name__}: {err}")


@dataclass
class StagedFile:
    """A complete file written aside, not yet under its name (:meth:`.backend.Backend.stage_frames`).

    :meth:`publish` puts it under its name, durable, once; the block that staged it drops it on the way out
    when it was not published, and nothing in the store ever showed it.
    """

    #: the rows the file holds
    rows: int
    _publish: Callable[[], None] = field(repr=False)
    published: bool = False

    def publish(self) -> None:
        """Put the file under its name (a pointer may name it after this returns); a second call does nothing."""
        if not self.published:
            self._publish()
            self.published = True


class StagingBackend:
    """A backend that writes a snapshot aside before it is published: ``write_frames`` is a staging published at
    once, the same on every backend."""

    def stage_frames(self, name: str, frames: Iterable[pl.DataFrame]) -> AbstractContextManager[StagedFile]:
        raise NotImplementedError

    def write_frames(self, name: str, frames: Iterable[pl.DataFrame]) -> int:
        with self.stage_frames(name, frames) as staged:
            staged.publish()
        return staged.rows
