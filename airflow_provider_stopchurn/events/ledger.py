"""The state of an event stream: the ledger of the event keys delivered, the watermark, and the window a run reads.

**State** (a :class:`~airflow_provider_stopchurn.store.SnapshotStore` under ``<state_uri>/events/<brand_id>/
<stream>/``, so the same backends, lock and crash rules as table snapshots): the *ledger* is the committed
"snapshot", a table of the keys of the events delivered inside the lookback window (the canonical JSON of the
event key columns, and each event's watermark); ``CURRENT`` also keeps the watermark (the highest watermark
delivered, epoch ms), the event key columns and how far back the ledger knows the delivered keys (``covered_ms``:
a window never starts before it, so a longer lookback does not send pruned keys again).

**Watermark and lookback.** With ``watermark_column`` (datetimes, dates or epoch milliseconds), the source is read
for ``since = watermark - lookback`` (the first run: everything): a SQL source gets ``since`` as named query
parameters, every source is filtered to ``watermark >= since`` by the plan too, and the ledger keeps the keys of the
events whose watermark is ``>= since`` of the next run (older keys can never come back through the filter, so
they are pruned as the watermark moves). A late row whose watermark is inside the window is sent once; one
older than the window is dropped and counted (``before_window``, with the rows a re-run returns that were
delivered before the window: the ledger no longer needs to know them). Without a watermark column every row is an event
and the ledger keeps every key it delivered.

**The run's clock** (``now_ms`` of :func:`~airflow_provider_stopchurn.events.engine.run_events`, the system
clock by default, read once per run) bounds the watermark: a row whose watermark is after the clock (a typo, a
placeholder year 2099, a producer whose clock runs ahead) is *held*: neither sent nor recorded, counted in
``held_future``, and sent by the first run whose clock has passed it. The committed watermark is at most
``now_ms - FUTURE_MARGIN``, so no row can put later events before the window; a committed watermark past the clock
(left by an earlier version) counts as the clock minus the margin. Watermarks are UTC instants: naive datetimes are
read as UTC, and the SQL readers pin PostgreSQL and MySQL sessions to UTC, so a naive column compared with
``since`` does not depend on the database's time zone.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from airflow_provider_stopchurn.events.options import EPOCH, MAX_LOOKBACK, EventOptions
from airflow_provider_stopchurn.exceptions import StopChurnConfigError
from airflow_provider_stopchurn.store import Committed, SnapshotStore

#: the engine's logger, whichever module logs: users and tests filter on its name
log = logging.getLogger("airflow_provider_stopchurn.events.engine")

#: Ledger column: the canonical JSON object of an event's key columns.
KEY = "__sc_event_key"
#: Ledger and plan column: an event's watermark, epoch ms (null without a watermark column).
WATERMARK = "__sc_watermark"
LEDGER_KINDS = {KEY: "string", WATERMARK: "int"}
#: Folder of the event state under the state root (beside the table folders ``<brand_id>/<table>``).
EVENTS_FOLDER = "events"
#: How far below the run's clock the watermark stays at most: a row stamped just before the clock by a producer
#: whose clock lags the worker's (or committed a moment late) is still inside the next run's window.
FUTURE_MARGIN = dt.timedelta(minutes=1)
#: The earliest start of a window (0001-01-01, epoch ms): a window reaching further back reads everything.
MIN_SINCE_MS = -(MAX_LOOKBACK // dt.timedelta(milliseconds=1))


@dataclass(frozen=True)
class Window:
    """Where the read starts: ``since_ms`` (epoch ms), None on a first run or without a watermark column."""

    since_ms: int | None

    @property
    def since(self) -> dt.datetime:
        """The start as a timezone-aware UTC datetime (1970-01-01 on a first run)."""
        return EPOCH + dt.timedelta(milliseconds=max(self.since_ms or 0, MIN_SINCE_MS))

    def parameters(self) -> dict[str, Any]:
        """The named query parameters a SQL source gets: ``since`` (UTC datetime) and ``since_ms`` (epoch ms)."""
        return {"since": self.since, "since_ms": self.since_ms or 0}


def iso_ms(ms: int) -> str:
    """An epoch-ms watermark as ISO 8601 UTC text (``...Z``), for the summary and messages."""
    try:
        return (EPOCH + dt.timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except OverflowError:  # an epoch-ms watermark beyond the datetimes: shown as the number it is
        return f"{ms} ms after 1970-01-01"


# --- the store -------------------------------------------------------------------------------------------------
def event_store(root: Any, brand_id: int, stream: str) -> SnapshotStore:
    """The state store of one event stream: ``<root>/events/<brand_id>/<stream>/`` (no I/O)."""
    if not isinstance(stream, str) or not stream.strip():
        raise StopChurnConfigError(f"The event stream needs a non-empty name, got {stream!r}.")
    return SnapshotStore(root / EVENTS_FOLDER, brand_id, stream)


@dataclass
class StreamState:
    """What CURRENT keeps besides the ledger: the watermark, the event key columns, and how far back the ledger
    knows the delivered keys (``covered_ms``: every event delivered with a watermark at or after it is in the
    ledger; None: every event delivered, or a ledger of an earlier version that did not record it)."""

    watermark_ms: int | None = None
    event_key: list[str] | None = None
    covered_ms: int | None = None

    @classmethod
    def of(cls, committed: Committed | None) -> StreamState:
        data = (committed.state if committed is not None else None) or {}
        return cls.of_record(data)

    @classmethod
    def of_record(cls, data: Mapping[str, Any]) -> StreamState:
        mark, key, covered = data.get("watermark_ms"), data.get("event_key"), data.get("covered_ms")
        return cls(
            int(mark) if mark is not None else None,
            list(key) if key is not None else None,
            int(covered) if covered is not None else None,
        )

    def record(self) -> dict[str, Any]:
        return {"watermark_ms": self.watermark_ms, "event_key": self.event_key, "covered_ms": self.covered_ms}


def _empty_ledger() -> pl.DataFrame:
    return pl.DataFrame({KEY: pl.Series([], dtype=pl.String), WATERMARK: pl.Series([], dtype=pl.Int64)})


def committed_ledger(committed: Committed | None) -> pl.DataFrame:
    """The keys and watermarks of the committed ledger (none before the stream's first commit)."""
    return committed.frame.select(KEY, WATERMARK) if committed is not None else _empty_ledger()


# --- the window ------------------------------------------------------------------------------------------------
def watermark_ceiling(now_ms: int) -> int:
    """The highest watermark a run whose clock reads ``now_ms`` may commit."""
    return now_ms - FUTURE_MARGIN // dt.timedelta(milliseconds=1)


def read_window(state: StreamState, options: EventOptions, now_ms: int) -> Window:
    """Where the read starts: the watermark minus the lookback, but never before what the ledger still knows
    (``covered_ms``: a longer lookback than the ledger was pruned under would send those events again). A watermark
    past the run's clock (the clock was set back, or ran ahead and was corrected, or an earlier version committed a
    row dated in the future) counts as the clock minus the margin, and the ledger's bound is not kept then: losing
    the events after the clock would be worse than sending some twice."""
    if options.watermark_column is None or state.watermark_ms is None:
        return Window(None)
    mark = state.watermark_ms
    if mark > watermark_ceiling(now_ms):
        log.warning(
            "The committed watermark %s is after this run's clock %s: reading from the clock minus %s instead "
            "(events of that span may be sent again once).",
            iso_ms(mark),
            iso_ms(now_ms),
            FUTURE_MARGIN,
        )
        # the ledger's bound is past the clock as well: a window starting there would drop every later event
        return Window(max(watermark_ceiling(now_ms) - options.lookback_ms, MIN_SINCE_MS))
    start = max(mark - options.lookback_ms, MIN_SINCE_MS)
    if state.covered_ms is not None and state.covered_ms > start:
        # the ledger no longer knows the keys delivered before covered_ms (pruned under a shorter lookback, or
        # before the clock was set back): a window reaching further back would send them again
        start = state.covered_ms
    return Window(start)


__all__ = [
    "EVENTS_FOLDER",
    "FUTURE_MARGIN",
    "KEY",
    "LEDGER_KINDS",
    "MIN_SINCE_MS",
    "WATERMARK",
    "StreamState",
    "Window",
    "committed_ledger",
    "event_store",
    "iso_ms",
    "read_window",
    "watermark_ceiling",
]
