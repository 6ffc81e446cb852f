"""What one delivery did: the chunks StopChurn acknowledged, the updates it refused in them, the counts, the failure.

The sending threads only send; ``deliver.py`` adds every count up on the calling thread into one
:class:`DeliveryReport`, which the caller settles from (and keeps the failure counts per row from, ``isolation.py``).
The helpers below read a row's ``id`` out of an encoded update, for messages and for picking rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import polars as pl

#: Where an encoded update holds its row's ``id`` (a ``json_path_match`` path).
ID_PATH = "$.data.data.id"


@dataclass(frozen=True)
class Rejection:
    """One update StopChurn refused: its position in the plan, its ``id`` and StopChurn's reason.

    ``transient``: not a refusal but a *held* update: alone, it still failed with a retryable error; StopChurn may
    have applied it (settling treats it as uncertain), and the next run sends it again.
    """

    position: int
    reason: str
    id: Any = None
    update: Any = None
    transient: bool = False

    def record(self) -> dict[str, Any]:
        record = {"position": self.position, "reason": self.reason, "id": self.id, "update": self.update}
        if self.transient:
            record["transient"] = True
        return record


@dataclass
class DeliveryReport:
    """What one delivery did: acknowledged chunks (with their rejections), requests, retries, the failure."""

    acked: dict[int, list[Rejection]] = field(default_factory=dict)
    #: chunks cut so far (every window reached), and the bytes of their bodies
    chunks: int = 0
    bytes: int = 0
    #: chunks whose request was started (a started chunk that is not acknowledged may have been applied)
    started: set[int] = field(default_factory=set)
    requests: int = 0
    retries: int = 0
    failure: BaseException | None = None
    #: every window was sent and acknowledged (no failure): a row not met was not part of the plan
    complete: bool = False
    #: chunks of one update cut for an isolated row: chunk -> the row's id
    isolated: dict[int, Any] = field(default_factory=dict)
    #: id texts of rows in ranges that failed transiently (held ones included) -> the first line of the error
    failed: dict[str, str] = field(default_factory=dict)
    #: id texts of held rows (still failing alone)
    held: set[str] = field(default_factory=set)
    #: id texts of rows in suspect chunks not sent once the run's budget was spent (sent again next run)
    skipped: set[str] = field(default_factory=set)
    #: id texts of watched rows that were met, and of those acknowledged (delivered)
    met: set[str] = field(default_factory=set)
    delivered: set[str] = field(default_factory=set)

    @property
    def uncertain(self) -> set[int]:
        """Chunks sent but not acknowledged: StopChurn may have applied them, in whole or in part."""
        return self.started - set(self.acked)

    @property
    def rejections(self) -> list[Rejection]:
        """The updates StopChurn refused (400), chunk by chunk."""
        return [r for r in self.rejections_all if not r.transient]

    @property
    def rejections_all(self) -> list[Rejection]:
        return [r for chunk in sorted(self.acked) for r in self.acked[chunk]]


def id_text(value: Any) -> str:
    """A row id as text, as ``json_path_match`` gives it (``1`` and ``"1"`` meet here: only used to pick rows)."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def update_id(updates: pl.Series, position: int) -> Any:
    """The row ``id`` of one encoded update (for messages)."""
    try:
        return row_id(orjson.loads(updates[position]))
    except orjson.JSONDecodeError:
        return None


def row_id(update: Any) -> Any:
    """The row ``id`` of a decoded update; None when it has none."""
    try:
        return update["data"]["data"].get("id")
    except (KeyError, TypeError, AttributeError):
        return None


def first_line(err: BaseException) -> str:
    """The first line of an error (its type's name when it has no text), as a rejection's or a failure's reason."""
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


__all__ = ["ID_PATH", "DeliveryReport", "Rejection", "first_line", "id_text", "row_id", "update_id"]
