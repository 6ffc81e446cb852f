"""The event engine: rows of a source sent once each to ``POST /client-data/event``. No Airflow import.

One run::

    lock (with a heartbeat) -> resume the plan an earlier try or a crashed run left (its unacknowledged chunks)
         -> read the source for the window [watermark - lookback, ...) -> encode one event per row
         -> drop rows older than the window, keys seen twice in the source and keys the ledger delivered already
         -> write the target ledger and the plan -> deliver (``deliver.py``), recording each acknowledged chunk
         -> commit the target ledger and the new watermark -> summary

**State** (a :class:`~airflow_provider_stopchurn.store.SnapshotStore` under ``<state_uri>/events/<brand_id>/
<stream>/``, so the same backends, lock and crash rules as table snapshots): the *ledger* is the committed
"snapshot", a table of the keys of the events delivered inside the lookback window (the canonical JSON of the
event key columns, and each event's watermark); ``CURRENT`` also keeps the watermark (the highest watermark
delivered, epoch ms), the event key columns and how far back the ledger knows the delivered keys (``covered_ms``:
a window never starts before it, so a longer lookback does not send pruned keys again). A plan is the events to
send, encoded, in order, with the ledger to commit once they are all acknowledged.

**Events have no diff to recompute**, so a plan is finished rather than re-planned:

* a crash, or a failure that a retry may fix (retries exhausted on 408/429/5xx/network errors, a lost lock),
  leaves the plan and its acknowledgements in the store; the next try (or the next run) sends the chunks not
  acknowledged, from the plan, then commits it and only then reads the source again;
* a permanent failure (400, 401, 413 of a single event) *settles* the plan (:func:`settle_event_plan`): the keys
  of the acknowledged chunks join the ledger, the watermark stays where it was, and the plan is dropped. The next
  run reads the same window again, the ledger drops what StopChurn acknowledged, and the rest is sent once the
  cause is fixed;
* so does the ``SETTLE_AFTER_FAILED_TRIES``-th try of a plan that StopChurn answered with a retryable error (a
  chunk it keeps failing with a 5xx must not hold the stream back for ever, and the next read must see a source
  fixed meanwhile); each such try leaves an empty mark in the plan's folder. A lost lock or a crash is no try.
  ``stopchurn settle --stream`` settles a pending plan by hand.

Nothing acknowledged is ever sent again. A chunk that was sent but not acknowledged (its answer was lost: a
timeout, a dropped connection, a crash while it was in flight, an HTTP retry after a lost answer) *is* sent
again, because StopChurn has no idempotency key and no client can know whether it was applied: its events are
delivered at least once, every other event exactly once.

**Watermark and lookback.** With ``watermark_column`` (datetimes, dates or epoch milliseconds), the source is read
for ``since = watermark - lookback`` (the first run: everything): a SQL source gets ``since`` as named query
parameters, every source is filtered to ``watermark >= since`` here too, and the ledger keeps the keys of the
events whose watermark is ``>= since`` of the next run (older keys can never come back through the filter, so
they are pruned as the watermark moves). A late row whose watermark is inside the window is sent once; one
older than the window is dropped and counted (``before_window``, with the rows a re-run returns that were
delivered before the window: the ledger no longer needs to know them). Without a watermark column every row is an event
and the ledger keeps every key it delivered.

**The run's clock** (``now_ms`` of :func:`run_events`, the system clock by default, read once per run) bounds the
watermark: a row whose watermark is after the clock (a typo, a placeholder year 2099, a producer whose clock runs
ahead) is *held*: neither sent nor recorded, counted in ``held_future``, and sent by the first run whose clock has
passed it. The committed watermark is at most ``now_ms - FUTURE_MARGIN``, so no row can put later events before
the window; a committed watermark past the clock (left by an earlier version) counts as the clock minus the margin.
Watermarks are UTC instants: naive datetimes are read as UTC, and the SQL readers pin PostgreSQL and MySQL
sessions to UTC, so a naive column compared with ``since`` does not depend on the database's time zone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
import pandas as pd
import polars as pl
import pyarrow as pa

from airflow_provider_stopchurn.api.client import fence_sender
from airflow_provider_stopchurn.encode.records import (
    Canonical,
    bodies_bytes,
    canonical_columns,
    check_reserved_names,
    encode_rows,
    json_fragment,
    plan_chunks,
)
from airflow_provider_stopchurn.exceptions import (
    DeliveryError,
    SnapshotError,
    SourceDataError,
    StopChurnConfigError,
    StopChurnError,
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.options import LOCK_TTL_S, NO_RUN_INFO, RunInfo, lock_problems
from airflow_provider_stopchurn.source.canonical import parse_json_columns
from airflow_provider_stopchurn.store import Committed, Plan, SnapshotStore
from airflow_provider_stopchurn.store.history import recorded
from airflow_provider_stopchurn.update.deliver import deliver_chunks
from airflow_provider_stopchurn.update.delivery_report import Rejection

log = logging.getLogger(__name__)

#: Ledger column: the canonical JSON object of an event's key columns.
KEY = "__sc_event_key"
#: Ledger and plan column: an event's watermark, epoch ms (null without a watermark column).
WATERMARK = "__sc_watermark"
#: Plan column: the event's JSON text, as sent.
EVENT = "__sc_event"
LEDGER_KINDS = {KEY: "string", WATERMARK: "int"}
#: Version of the event plan files; a pending plan of another version is dropped (its events are read again).
EVENT_PLAN_FORMAT = 1
#: Folder of the event state under the state root (beside the table folders ``<brand_id>/<table>``).
EVENTS_FOLDER = "events"
#: After this many tries of one plan ended with StopChurn still answering a retryable error (5xx, 408, 429, a
#: timeout, a dropped connection, a 200 that is not its acknowledgement), the plan is settled: a chunk StopChurn
#: keeps failing must not hold back the stream, and the next read must see a source that was fixed meanwhile.
SETTLE_AFTER_FAILED_TRIES = 3
_MAX_LISTED = 5
_USER_ID = "__sc_user_id"
_VALUE = "__sc_value"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_WATERMARK_KINDS = ("timestamp", "date", "int")
#: How far below the run's clock the watermark stays at most: a row stamped just before the clock by a producer
#: whose clock lags the worker's (or committed a moment late) is still inside the next run's window.
FUTURE_MARGIN = dt.timedelta(minutes=1)
#: The longest ``lookback``: back from 1970 to the first datetime (0001-01-01); longer is beyond any datetime.
MAX_LOOKBACK = _EPOCH - dt.datetime(1, 1, 1, tzinfo=dt.UTC)
#: The earliest start of a window (0001-01-01, epoch ms): a window reaching further back reads everything.
_MIN_SINCE_MS = -(MAX_LOOKBACK // dt.timedelta(milliseconds=1))
#: Floats are exact integers only up to 2**53: a larger float user id may be another user's id, rounded.
_MAX_EXACT_FLOAT = 2**53


# --- options ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventOptions:
    """Everything that shapes one event run. Validated on construction (no I/O).

    :param brand_id: the StopChurn brand of every event.
    :param user_id_column: the column holding each event's user id (sent as a string).
    :param name: the name of every event; or ``name_column``, the column holding each event's name.
    :param value_column: a column sent as the event's ``value`` (omitted when null); or ``value_columns``, columns
        sent as one object ``{"<column>": <value>, ...}``. Neither: events carry no value.
    :param event_key: the columns that make an event unique; None: every column of the source.
    :param watermark_column: a column of datetimes, dates or epoch milliseconds: read incrementally by it.
    :param lookback: how far behind the watermark the next read starts (late rows inside it are still sent once).
    """

    brand_id: int
    user_id_column: str
    name: str | None = None
    name_column: str | None = None
    value_column: str | None = None
    value_columns: tuple[str, ...] | None = None
    event_key: tuple[str, ...] | None = None
    watermark_column: str | None = None
    lookback: dt.timedelta = dt.timedelta(0)
    chunk_size: int = 1000
    max_chunk_bytes: int = 5_000_000
    max_concurrent_requests: int = 4
    dry_run: bool = False
    nest_dotted_columns: bool = True
    #: text columns holding JSON, parsed before encoding (as the update operator's ``json_columns``)
    json_columns: tuple[str, ...] = ()
    holder: str = "stopchurn-events"
    #: names the DAG run (and task): a later try of the same run reports the run's whole delivery
    run_key: str | None = None
    #: the stream lock's lease (as the update operator's ``lock_ttl_s``)
    lock_ttl_s: float = LOCK_TTL_S
    #: while another run holds the stream's lock, wait up to this many seconds for it (as an update run does)
    lock_wait_s: float = 300.0
    progress_interval_s: float = 10.0
    #: the DAG, task, DAG run and try this run is (recorded in the store's history; not an operator argument)
    run_info: RunInfo = NO_RUN_INFO

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.brand_id, bool) or not isinstance(self.brand_id, int):
            problems.append(f"brand_id must be an integer, got {self.brand_id!r}")
        if isinstance(self.json_columns, str):  # one column named alone
            object.__setattr__(self, "json_columns", (self.json_columns,))
        elif not isinstance(self.json_columns, tuple):
            object.__setattr__(self, "json_columns", tuple(self.json_columns or ()))
        if not all(_is_name(c) for c in self.json_columns):
            problems.append(f"json_columns must name columns, got {self.json_columns!r}")
        if not _is_name(self.user_id_column):
            problems.append(f"user_id_column must name a column, got {self.user_id_column!r}")
        if (self.name is None) == (self.name_column is None):
            problems.append("give exactly one of name (every event's name) or name_column")
        elif self.name is not None and not (isinstance(self.name, str) and self.name.strip()):
            problems.append(f"name must be a non-empty string, got {self.name!r}")
        elif self.name_column is not None and not _is_name(self.name_column):
            problems.append(f"name_column must name a column, got {self.name_column!r}")
        if self.value_column is not None and self.value_columns is not None:
            problems.append("give at most one of value_column or value_columns")
        if self.value_column is not None and not _is_name(self.value_column):
            problems.append(f"value_column must name a column, got {self.value_column!r}")
        if self.value_columns is not None and not (self.value_columns and all(_is_name(c) for c in self.value_columns)):
            problems.append(f"value_columns must name one or more columns, got {self.value_columns!r}")
        if self.event_key is not None and not (self.event_key and all(_is_name(c) for c in self.event_key)):
            problems.append(f"event_key must name one or more columns, got {self.event_key!r}")
        if self.watermark_column is not None and not _is_name(self.watermark_column):
            problems.append(f"watermark_column must name a column, got {self.watermark_column!r}")
        if not isinstance(self.lookback, dt.timedelta) or self.lookback < dt.timedelta(0):
            problems.append(f"lookback must be a datetime.timedelta >= 0, got {self.lookback!r}")
        elif self.lookback > MAX_LOOKBACK:
            problems.append(
                f"lookback must be at most {MAX_LOOKBACK.days} days (back from 1970 to the year 1, the range of "
                f"datetimes), got {self.lookback!r}"
            )
        elif self.lookback and self.watermark_column is None:
            problems.append("lookback needs a watermark_column (it is measured back from the watermark)")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            problems.append(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if not isinstance(self.max_chunk_bytes, int) or self.max_chunk_bytes < 64:
            problems.append(f"max_chunk_bytes must be an integer >= 64, got {self.max_chunk_bytes!r}")
        if not isinstance(self.max_concurrent_requests, int) or self.max_concurrent_requests < 1:
            problems.append(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests!r}")
        problems += lock_problems(self.lock_wait_s, self.lock_ttl_s)
        if problems:
            raise StopChurnConfigError("Invalid event options: " + "; ".join(problems) + ".")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def lookback_ms(self) -> int:
        return self.lookback // dt.timedelta(milliseconds=1)

    # what deliver() reads besides the fields above
    @property
    def table_name(self) -> str:
        return "events"

    @property
    def on_rejected_rows(self) -> str:
        return "fail"


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


# --- the window the source is read for ------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Where the read starts: ``since_ms`` (epoch ms), None on a first run or without a watermark column."""

    since_ms: int | None

    @property
    def since(self) -> dt.datetime:
        """The start as a timezone-aware UTC datetime (1970-01-01 on a first run)."""
        return _EPOCH + dt.timedelta(milliseconds=max(self.since_ms or 0, _MIN_SINCE_MS))

    def parameters(self) -> dict[str, Any]:
        """The named query parameters a SQL source gets: ``since`` (UTC datetime) and ``since_ms`` (epoch ms)."""
        return {"since": self.since, "since_ms": self.since_ms or 0}


Source = pd.DataFrame | Callable[[Window], pd.DataFrame]


class EventSender(Protocol):
    """What the engine needs from a client: post one encoded event body, raise on failure."""

    def post_event_body(self, body: bytes) -> Any: ...


class _ToEventRoute:
    """Adapts an :class:`EventSender` to :func:`deliver`, which posts through ``post_update_body``."""

    def __init__(self, sender: EventSender) -> None:
        self._sender = sender

    def post_update_body(self, body: bytes) -> Any:
        return self._sender.post_event_body(body)


# --- summary ---------------------------------------------------------------------------------------------------
@dataclass
class EventSummary:
    """What the run delivered; ``as_dict()`` is what the operator returns (and Airflow puts in XCom).

    ``sent`` counts the events StopChurn acknowledged in the whole DAG run (a later try adds what earlier tries
    delivered); ``duplicates`` the rows dropped because their key was delivered already or repeats in the source;
    ``before_window`` the rows older than the window (delivered by an earlier run, or late beyond the lookback),
    not sent; ``held_future`` the rows dated after the run's clock, held (not sent) until a run's clock passes
    them; ``resumed_chunks`` the chunks of an unfinished plan this run sent; ``settled_chunks`` the chunks of it an
    earlier try of this DAG run had delivered (counted in ``sent``, not sent again).
    """

    brand_id: int
    stream: str
    sent: int = 0
    duplicates: int = 0
    before_window: int = 0
    held_future: int = 0
    chunks: int = 0
    bytes: int = 0
    requests: int = 0
    retries: int = 0
    resumed_chunks: int = 0
    settled_chunks: int = 0
    since: str | None = None
    watermark: str | None = None
    watermark_ms: int | None = None
    ledger_keys: int = 0
    dry_run: bool = False
    state_uri: str = ""
    duration_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.dry_run:
            data.pop("samples")
        return data

    def line(self) -> str:
        mode = " (dry run: nothing sent)" if self.dry_run else ""
        resumed = f", {self.resumed_chunks} chunks resumed from an unfinished plan" if self.resumed_chunks else ""
        held = f", {self.held_future} dated after the run's clock held" if self.held_future else ""
        return (
            f"StopChurn events of brand {self.brand_id} stream {self.stream!r}{mode}: {self.sent} sent, "
            f"{self.duplicates} duplicates dropped, {self.before_window} before the window{held}; "
            f"{self.chunks} chunks, {self.bytes} bytes, {self.retries} HTTP retries{resumed}; "
            f"watermark {self.watermark}; {self.duration_s:.2f}s; state {self.state_uri}"
        )

    def record_fields(self) -> dict[str, Any]:
        """The run's fields in the store's history (``history``: kind ``events``)."""
        return {
            "events_sent": self.sent,
            "duplicates": self.duplicates,
            "before_window": self.before_window,
            "held_future": self.held_future,
            "watermark": self.watermark,
            "ledger_size": self.ledger_keys,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "requests": self.requests,
            "http_retries": self.retries,
            "resumed_chunks": self.resumed_chunks,
            "settled_chunks": self.settled_chunks,
        }

    def set_watermark(self, ms: int | None) -> None:
        self.watermark_ms = ms
        self.watermark = None if ms is None else _iso(ms)


def _iso(ms: int) -> str:
    try:
        return (_EPOCH + dt.timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except OverflowError:  # an epoch-ms watermark beyond the datetimes: shown as the number it is
        return f"{ms} ms after 1970-01-01"


# --- the store -------------------------------------------------------------------------------------------------
def event_store(root: Any, brand_id: int, stream: str) -> SnapshotStore:
    """The state store of one event stream: ``<root>/events/<brand_id>/<stream>/`` (no I/O)."""
    if not isinstance(stream, str) or not stream.strip():
        raise StopChurnConfigError(f"The event stream needs a non-empty name, got {stream!r}.")
    return SnapshotStore(root / EVENTS_FOLDER, brand_id, stream)


@dataclass
class _State:
    """What CURRENT keeps besides the ledger: the watermark, the event key columns, and how far back the ledger
    knows the delivered keys (``covered_ms``: every event delivered with a watermark at or after it is in the
    ledger; None: every event delivered, or a ledger of an earlier version that did not record it)."""

    watermark_ms: int | None = None
    event_key: list[str] | None = None
    covered_ms: int | None = None

    @classmethod
    def of(cls, committed: Committed | None) -> _State:
        data = (committed.state if committed is not None else None) or {}
        return cls.of_record(data)

    @classmethod
    def of_record(cls, data: Mapping[str, Any]) -> _State:
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


def _ledger(committed: Committed | None) -> pl.DataFrame:
    return committed.frame.select(KEY, WATERMARK) if committed is not None else _empty_ledger()


# --- encoding: source rows -> events ---------------------------------------------------------------------------
@dataclass
class Encoded:
    """One event per source row, in source order: ``EVENT`` (JSON text), ``KEY``, ``WATERMARK``."""

    frame: pl.DataFrame
    key_columns: list[str]


def _as_frame(source: Any) -> pd.DataFrame:
    """A pandas frame of the source; Arrow batches (a SQL source) keep their Arrow types (``pd.ArrowDtype``)."""
    if isinstance(source, pd.DataFrame):
        return source
    if isinstance(source, pl.DataFrame | pl.LazyFrame):
        source = source.collect() if isinstance(source, pl.LazyFrame) else source
        check_reserved_names(source.columns)  # before polars renames an empty name to "column_1"
        return source.to_pandas(use_pyarrow_extension_array=True)
    if isinstance(source, pa.Table):
        return source.to_pandas(types_mapper=pd.ArrowDtype)
    if isinstance(source, pa.RecordBatch):
        return pa.Table.from_batches([source]).to_pandas(types_mapper=pd.ArrowDtype)
    if isinstance(source, pa.RecordBatchReader | Iterator | list):
        batches = list(source)
        if batches and all(isinstance(b, pa.RecordBatch) for b in batches):
            return pa.Table.from_batches(batches).to_pandas(types_mapper=pd.ArrowDtype)
    raise SourceDataError(
        f"The event source must be a pandas or polars DataFrame or Arrow data, got {type(source).__name__}."
    )


def encode_events(df: Any, options: EventOptions, key_order: Sequence[str] | None = None) -> Encoded:
    """Validate the source and encode one event per row (vectorised); raise before anything is sent.

    :param key_order: the event key columns as the ledger recorded them: the same columns in another order (a
        query rewritten, a ``SELECT *`` of a recreated table) are encoded in that order, so their keys match.
    """
    df = _as_frame(df)
    columns = [str(c) for c in df.columns]
    key_columns = list(options.event_key) if options.event_key is not None else columns
    if key_order is not None and sorted(key_order) == sorted(key_columns):
        key_columns = list(key_order)
    named = {
        "user_id_column": [options.user_id_column],
        "name_column": [options.name_column] if options.name_column else [],
        "value_column": [options.value_column] if options.value_column else [],
        "value_columns": list(options.value_columns or ()),
        "event_key": key_columns,
        "watermark_column": [options.watermark_column] if options.watermark_column else [],
    }
    missing = [f"{arg} {c!r}" for arg, names in named.items() for c in names if c not in df.columns]
    if missing:
        raise SourceDataError(
            f"The event source lacks {', '.join(missing)}; its columns are {columns or '(none)'}. Nothing was sent."
        )
    needed = list(dict.fromkeys(c for names in named.values() for c in names))
    canon, kinds = canonical_columns(df[needed])
    if options.json_columns:
        absent = [c for c in options.json_columns if c not in needed]
        if absent:
            raise SourceDataError(
                f"json_columns names {', '.join(map(repr, absent))}, which no event argument uses (columns used: "
                f"{needed}). Nothing was sent."
            )
        parsed = parse_json_columns(
            Canonical(frame=canon, kinds=kinds, key_columns=tuple(key_columns)),
            options.json_columns,
            keys_may_be_json=True,
        )
        canon, kinds = parsed.frame, parsed.kinds
    rows = canon.height
    canon = canon.with_columns(_user_id(canon, kinds, options.user_id_column).alias(_USER_ID))
    _check_present(canon, _USER_ID, f"user id (column {options.user_id_column!r})")
    pieces: list[pl.Expr] = [
        pl.lit('{"brandId":' + str(int(options.brand_id)) + ',"userId":'),
        json_fragment(_USER_ID, "string", pl.String()),
        pl.lit(',"name":'),
    ]
    if options.name is not None:
        pieces.append(pl.lit(json.dumps(options.name, ensure_ascii=False)))
    else:
        name = str(options.name_column)
        if rows and kinds[name] not in ("string", "null"):
            raise SourceDataError(f"Event name column {name!r} must hold strings, not {kinds[name]} values.")
        _check_present(canon, name, f"event name (column {name!r})")
        pieces.append(json_fragment(name, "string", pl.String()))
    if options.value_columns is not None:
        cols = list(options.value_columns)
        obj = encode_rows(
            canon.select(cols), {c: kinds[c] for c in cols}, nest_dotted_columns=options.nest_dotted_columns
        )
        canon = canon.with_columns(obj.alias(_VALUE))
        pieces += [pl.lit(',"value":'), pl.col(_VALUE)]
    elif options.value_column is not None:
        name = options.value_column
        fragment = json_fragment(name, kinds[name], canon.schema[name])
        # a null value is left out: the field is optional, and a null may not fit the event's definition
        pieces.append(pl.when(fragment == "null").then(pl.lit("")).otherwise(pl.lit(',"value":') + fragment))
    pieces.append(pl.lit("}"))
    keys = encode_rows(canon.select(key_columns), {c: kinds[c] for c in key_columns}, nest_dotted_columns=False)
    frame = canon.select(pl.concat_str(pieces).alias(EVENT)).with_columns(
        keys.alias(KEY), _watermark(canon, kinds, options.watermark_column).alias(WATERMARK)
    )
    return Encoded(frame, key_columns)


def _user_id(canon: pl.DataFrame, kinds: Mapping[str, str], column: str) -> pl.Series:
    """The user id as text: strings as they are, integers (also integral floats and decimals) as digits."""
    values = canon.get_column(column)
    kind = kinds[column]
    if kind in ("string", "null"):
        return values.cast(pl.String)
    if kind == "int":
        return values.cast(pl.String)
    if kind == "float":
        fractional = values.is_not_null() & (values != values.floor())
        if fractional.any():
            raise SourceDataError(
                f"User id column {column!r} holds non-integral numbers, e.g. "
                f"{values.filter(fractional).head(_MAX_LISTED).to_list()}; user ids are strings or whole numbers."
            )
        inexact = values.is_not_null() & (values.abs() > _MAX_EXACT_FLOAT)
        if inexact.any():
            shown = ", ".join(f"{v:g}" for v in values.filter(inexact).head(_MAX_LISTED).to_list())
            raise SourceDataError(
                f"User id column {column!r} holds numbers too large to be exact as floats, e.g. {shown}; a float "
                f"is an exact whole number only up to 2**53, so such an id may be another user's, rounded. Read "
                "the column as integers or text. Nothing was sent."
            )
        return values.cast(pl.Int64).cast(pl.String)
    if kind == "decimal":
        fractional = values.str.contains(".", literal=True) | values.str.contains("E-", literal=True)
        if fractional.fill_null(False).any():
            raise SourceDataError(f"User id column {column!r} holds non-integral decimals; user ids must be whole.")
        return values
    raise SourceDataError(f"User id column {column!r} must hold strings or integers, not {kind} values.")


def _check_present(canon: pl.DataFrame, column: str, what: str) -> None:
    """Refuse null and empty values of a column every event needs (before anything is sent)."""
    values = canon.get_column(column)
    bad = values.is_null() | (values == "")
    if bad.fill_null(True).any():
        positions = bad.fill_null(True).arg_true()
        shown = positions.head(_MAX_LISTED).to_list()
        more = f" (and {positions.len() - len(shown)} more)" if positions.len() > len(shown) else ""
        raise SourceDataError(
            f"{positions.len()} row(s) of the event source have no {what} (null or empty), at row position(s) "
            f"{', '.join(map(str, shown))}{more}; every event needs one. Nothing was sent."
        )


def _watermark(canon: pl.DataFrame, kinds: Mapping[str, str], column: str | None) -> pl.Series:
    if column is None:
        return pl.repeat(None, canon.height, dtype=pl.Int64, eager=True)
    kind = kinds[column]
    values = canon.get_column(column)
    missing = values.is_null()
    if missing.any():
        positions = missing.arg_true()
        raise SourceDataError(
            f"{positions.len()} row(s) of the event source have no watermark (column {column!r} is null), at row "
            f"position(s) {', '.join(map(str, positions.head(_MAX_LISTED).to_list()))}; the window of the next "
            "run could not place them. Nothing was sent."
        )
    if canon.height and kind not in _WATERMARK_KINDS:
        raise SourceDataError(
            f"Watermark column {column!r} must hold datetimes, dates or epoch milliseconds, not {kind} values."
        )
    return values.cast(pl.Int64)


# --- planning --------------------------------------------------------------------------------------------------
@dataclass
class EventPlan:
    """The events of one run still to send (in send order) and the ledger and state to commit after them."""

    events: pl.DataFrame
    chunks: list[tuple[int, int]]
    bytes: int
    target: pl.DataFrame
    state: _State
    duplicates: int = 0
    before_window: int = 0
    held_future: int = 0


def _ceiling(now_ms: int) -> int:
    """The highest watermark a run whose clock reads ``now_ms`` may commit."""
    return now_ms - FUTURE_MARGIN // dt.timedelta(milliseconds=1)


def make_event_plan(
    encoded: Encoded,
    ledger: pl.DataFrame,
    state: _State,
    window: Window,
    options: EventOptions,
    now_ms: int | None = None,
) -> EventPlan:
    """Drop rows older than the window, rows dated after the run's clock and keys already delivered; order,
    chunk; the ledger after delivery.

    :param now_ms: the run's clock (epoch ms). Rows whose watermark is after it are held: not sent, not recorded,
        so a later run whose clock has passed them sends them; the new watermark stays at most
        ``now_ms - FUTURE_MARGIN``. None: no clock (nothing held, the watermark not capped).
    """
    frame = encoded.frame
    if state.event_key is not None and state.event_key != encoded.key_columns and ledger.height:
        raise StopChurnConfigError(
            f"The event key changed from {state.event_key} to {encoded.key_columns}: the ledger of the "
            f"{ledger.height} events delivered in the lookback window cannot recognise them under the new key, so "
            "they would be sent again. Nothing was sent. Keep event_key as it was (an explicit event_key is "
            "not affected by new source columns), or start a new stream (another stream_id) knowing that the "
            "events of the window will be sent again."
        )
    if options.watermark_column is None and state.watermark_ms is not None:
        raise StopChurnConfigError(
            f"The event stream was read by a watermark column, and its ledger knows only the events delivered "
            f"since {_iso(state.covered_ms if state.covered_ms is not None else state.watermark_ms)} (the lookback "
            "window): without watermark_column every older event the source returns would be sent again. Nothing "
            "was sent. Keep watermark_column as it was, or start a new stream (another stream_id) knowing that "
            "every event the source returns will be sent again."
        )
    held = 0
    if options.watermark_column is not None and now_ms is not None:
        future = frame.get_column(WATERMARK) > now_ms
        held = int(future.sum())
        if held:
            frame = frame.filter(~future)
    before_window = 0
    if window.since_ms is not None:
        recent = frame.get_column(WATERMARK) >= window.since_ms
        before_window = frame.height - int(recent.sum())
        if before_window:
            frame = frame.filter(recent)
    unique = frame.unique(subset=[KEY], keep="first", maintain_order=True)
    duplicates = frame.height - unique.height
    if ledger.height and unique.height:
        fresh = unique.filter(~pl.col(KEY).is_in(ledger.get_column(KEY).implode()))
        duplicates += unique.height - fresh.height
    else:
        fresh = unique
    if options.watermark_column is not None:
        fresh = fresh.sort(WATERMARK, maintain_order=True)
    sizes = fresh.get_column(EVENT).str.len_bytes().to_numpy()
    try:
        chunks = plan_chunks(sizes, chunk_size=options.chunk_size, max_chunk_bytes=options.max_chunk_bytes)
    except SourceDataError as err:
        raise SourceDataError(f"An event is too large for one request: {err}") from err
    after = _State(state.watermark_ms, encoded.key_columns, state.covered_ms)
    if options.watermark_column is not None and fresh.height:
        top = int(fresh.get_column(WATERMARK).max())  # type: ignore[arg-type]
        after.watermark_ms = top if state.watermark_ms is None else max(state.watermark_ms, top)
    if now_ms is not None and after.watermark_ms is not None:
        # never past the run's clock: a watermark in the future would put every later event before the window
        after.watermark_ms = min(after.watermark_ms, _ceiling(now_ms))
    if options.watermark_column is not None and after.watermark_ms is not None:
        # the ledger is pruned to this bound below; what it pruned before stays forgotten, so a longer lookback or
        # a clock set back must not open the window below what the ledger still knows (that would resend)
        bound = after.watermark_ms - options.lookback_ms
        pulled_back = state.watermark_ms is not None and after.watermark_ms < state.watermark_ms
        if state.covered_ms is None or pulled_back:
            # pulled back by the run's clock: a clock that ran ahead and was corrected looks the same as one set
            # back, and losing the events after the clock is worse than sending some twice (see _window)
            after.covered_ms = bound
        else:
            after.covered_ms = max(bound, state.covered_ms)
    target = _prune(pl.concat([ledger, fresh.select(KEY, WATERMARK)]), after, options)
    return EventPlan(fresh, chunks, bodies_bytes(sizes, chunks), target, after, duplicates, before_window, held)


def _prune(ledger: pl.DataFrame, state: _State, options: EventOptions) -> pl.DataFrame:
    """Keep only the keys a later read can return again (watermark >= the next window's start)."""
    if options.watermark_column is None or state.watermark_ms is None:
        return ledger
    return ledger.filter(pl.col(WATERMARK) >= state.watermark_ms - options.lookback_ms)


# --- the run ---------------------------------------------------------------------------------------------------
def run_events(
    source: Source,
    store: SnapshotStore,
    sender: EventSender | None,
    options: EventOptions,
    *,
    stream: str = "",
    now_ms: int | None = None,
) -> EventSummary:
    """Send the events of ``source`` not delivered yet; see the module docstring.

    :param source: a DataFrame, or a callable given the :class:`Window` to read (called once, after any unfinished
        plan was finished).
    :param store: the stream's state store (:func:`event_store`).
    :param sender: posts event bodies (a ``StopChurnClient``); may be None only for a dry run.
    :param stream: the stream's name, for the summary and messages.
    :param now_ms: the run's clock (epoch ms), read once: rows dated after it are held and the watermark stays
        ``FUTURE_MARGIN`` below it. Default: the system clock when the run has the stream's lock (after any wait).
    """
    started = time.monotonic()
    clock_given = now_ms is not None
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    summary = EventSummary(options.brand_id, stream or store.table_name, dry_run=options.dry_run)
    summary.state_uri = store.location
    if options.dry_run:
        _dry_run(source, store, options, summary, now_ms)
    else:
        if sender is None:
            raise StopChurnConfigError("A sender is required unless dry_run=True.")
        run = _Run(store, _ToEventRoute(sender), options, summary, now_ms)
        # a run that waited for the lock holds its own lease from then on: the fence below checks that one
        with (
            recorded(store, options, kind="events", fields=summary.record_fields) as recording,  # however it ends
            store.lock(options.holder, ttl_s=options.lock_ttl_s, wait_s=options.lock_wait_s) as lock,
            lock.heartbeat(),
            recording.holding(lock),
        ):
            run.lock = lock
            if not clock_given:
                # read again once the lock is held: a run that waited (lock_wait_s) would otherwise judge a
                # watermark another run committed meanwhile by a clock minutes old, find it "after the clock", read
                # from there and send again the events of that span the ledger no longer knows
                run.now_ms = time.time_ns() // 1_000_000
            fenced = fence_sender(sender, lock.fence)  # every attempt, retries included
            run.sender, run.request_s = _ToEventRoute(fenced), float(getattr(fenced, "request_s", 0.0))
            committed = store.read_committed()
            record = committed.run if committed is not None else None
            if options.run_key is not None and record and record.get("run_key") == options.run_key:
                summary.sent += int(record.get("sent", 0))  # earlier tries of this DAG run
            pending = store.pending_plan()
            if pending is not None:
                run.resume(pending)
            run.fresh(source)
    summary.duration_s = round(time.monotonic() - started, 3)
    log.info("%s", summary.line())
    return summary


def _read(source: Source, window: Window, options: EventOptions, state: _State) -> Encoded:
    frame = source(window) if callable(source) else source
    return encode_events(frame, options, key_order=state.event_key)


def _dry_run(source: Source, store: SnapshotStore, options: EventOptions, summary: EventSummary, now_ms: int) -> None:
    """What a run would send now, with nothing sent or written: an unfinished plan counts as delivered."""
    committed = store.read_committed()
    state, ledger = _State.of(committed), _ledger(committed)
    pending = store.pending_plan(cleanup=False)
    if pending is not None and pending.meta.get("plan_format") == EVENT_PLAN_FORMAT:
        acked = store.acked(pending)
        summary.resumed_chunks = len(pending.chunks) - len(acked)
        ledger = store.read_snapshot(pending.target_version).select(KEY, WATERMARK)
        state = _State.of_record(pending.meta["state"])
    window = _window(state, options, now_ms)
    plan = make_event_plan(_read(source, window, options, state), ledger, state, window, options, now_ms)
    _plan_counts(summary, plan, window)
    summary.sent = plan.events.height
    summary.samples = [orjson.loads(e) for e in plan.events.get_column(EVENT).head(5).to_list()]


def _window(state: _State, options: EventOptions, now_ms: int) -> Window:
    """Where the read starts: the watermark minus the lookback, but never before what the ledger still knows
    (``covered_ms``: a longer lookback than the ledger was pruned under would send those events again). A watermark
    past the run's clock (the clock was set back, or ran ahead and was corrected, or an earlier version committed a
    row dated in the future) counts as the clock minus the margin, and the ledger's bound is not kept then: losing
    the events after the clock would be worse than sending some twice."""
    if options.watermark_column is None or state.watermark_ms is None:
        return Window(None)
    mark = state.watermark_ms
    if mark > _ceiling(now_ms):
        log.warning(
            "The committed watermark %s is after this run's clock %s: reading from the clock minus %s instead "
            "(events of that span may be sent again once).",
            _iso(mark),
            _iso(now_ms),
            FUTURE_MARGIN,
        )
        # the ledger's bound is past the clock as well: a window starting there would drop every later event
        return Window(max(_ceiling(now_ms) - options.lookback_ms, _MIN_SINCE_MS))
    start = max(mark - options.lookback_ms, _MIN_SINCE_MS)
    if state.covered_ms is not None and state.covered_ms > start:
        # the ledger no longer knows the keys delivered before covered_ms (pruned under a shorter lookback, or
        # before the clock was set back): a window reaching further back would send them again
        start = state.covered_ms
    return Window(start)


def _plan_counts(summary: EventSummary, plan: EventPlan, window: Window) -> None:
    summary.duplicates += plan.duplicates
    summary.before_window += plan.before_window
    summary.held_future += plan.held_future
    summary.chunks += len(plan.chunks)
    summary.bytes += plan.bytes
    summary.since = None if window.since_ms is None else _iso(window.since_ms)
    summary.set_watermark(plan.state.watermark_ms)
    summary.ledger_keys = plan.target.height


class _Run:
    """One locked run: finish an unfinished plan, then plan and deliver the source's new events."""

    def __init__(
        self, store: SnapshotStore, sender: _ToEventRoute, options: EventOptions, summary: EventSummary, now_ms: int
    ):
        self.now_ms = now_ms
        self.store = store
        self.sender = sender
        self.options = options
        self.summary = summary
        self.lock: Any = None
        self.request_s = 0.0  # the longest time one request may take (the lock fences each one)

    def resume(self, plan: Plan) -> None:
        if plan.meta.get("plan_format") != EVENT_PLAN_FORMAT:
            log.warning(
                "Dropping the pending plan %s in %s, written by another version of this provider; its events are "
                "read from the source again.",
                plan.plan_id,
                self.store.location,
            )
            self.store.discard_plan(plan)
            return
        acked = self.store.acked(plan)
        events = self.store.read_changes(plan).get_column(EVENT)
        if self.options.run_key is not None and plan.meta.get("run_key") == self.options.run_key:
            # an earlier try of this DAG run sent these
            self.summary.sent += sum(plan.chunks[c][1] - plan.chunks[c][0] for c in acked)
            self.summary.settled_chunks += len(acked)
        todo = [c for c in range(len(plan.chunks)) if c not in acked]
        log.warning(
            "Resuming the unfinished event plan %s of %r: %d of %d chunks were acknowledged; sending the other %d "
            "(a chunk that was in flight when it stopped may reach StopChurn twice: the API has no idempotency key).",
            plan.plan_id,
            self.summary.stream,
            len(acked),
            len(plan.chunks),
            len(todo),
        )
        self.summary.resumed_chunks += len(todo)
        sizes = events.str.len_bytes().to_numpy()
        self.summary.chunks += len(todo)
        self.summary.bytes += bodies_bytes(sizes, [plan.chunks[c] for c in todo])
        self._deliver(plan, events, todo, acked)
        self.summary.set_watermark(plan.meta["state"]["watermark_ms"])

    def fresh(self, source: Source) -> None:
        committed = self.store.read_committed()
        state = _State.of(committed)
        window = _window(state, self.options, self.now_ms)
        ledger = _ledger(committed)
        plan = make_event_plan(
            _read(source, window, self.options, state), ledger, state, window, self.options, self.now_ms
        )
        _plan_counts(self.summary, plan, window)
        if not plan.events.height:
            self.summary.ledger_keys = ledger.height
            self.summary.set_watermark(state.watermark_ms)
            return
        target_version = self.store.write_snapshot(plan.target)
        stored = self.store.write_plan(
            target_version=target_version,
            base_version=committed.version if committed is not None else None,
            changes=plan.events,
            chunks=plan.chunks,
            meta={
                "plan_format": EVENT_PLAN_FORMAT,
                "engine": "events",
                "brand_id": self.options.brand_id,
                "run_key": self.options.run_key,
                "state": plan.state.record(),
                "target_rows": plan.target.height,
                "base_state": state.record(),
            },
        )
        self._deliver(stored, plan.events.get_column(EVENT), list(range(len(plan.chunks))), set())

    def _deliver(self, plan: Plan, events: pl.Series, todo: Sequence[int], acked_before: set[int]) -> None:
        def record(chunk: int, rejections: list[Rejection]) -> None:
            self.store.ack(plan, chunk)

        lock = self.lock
        report = deliver_chunks(
            events,
            plan.chunks,
            todo,
            self.sender,
            self.options,
            record,
            guard=lambda: lock.fence(self.request_s),
        )
        self.summary.requests += report.requests
        self.summary.retries += report.retries
        acked = acked_before | set(report.acked)
        self.summary.sent += sum(plan.chunks[c][1] - plan.chunks[c][0] for c in report.acked)
        failure = report.failure
        if failure is None:
            self._commit(plan, plan.target_version, int(plan.meta.get("target_rows", -1)), plan.meta["state"])
            return
        if not (isinstance(failure, StopChurnError) and failure.permanent):
            if isinstance(failure, DeliveryError) and self._failed_tries(plan) >= SETTLE_AFTER_FAILED_TRIES:
                # StopChurn keeps failing this plan: settle it, so the next try reads the source again
                self._settle(plan)
                raise _settled_after_tries(failure, len(acked), len(plan.chunks), self.summary.stream) from failure
            # a crash-like ending (retries exhausted, a lost lock): the plan stays, the next try sends the rest
            log.warning(
                "Event delivery of %r stopped (%s); %d of %d chunks acknowledged. The plan stays in %s: the next try "
                "sends the other chunks.",
                self.summary.stream,
                type(failure).__name__,
                len(acked),
                len(plan.chunks),
                self.store.location,
            )
            raise failure
        try:
            self._settle(plan)
        except Exception as err:
            log.error("Could not settle event plan %s (%s); the next run finishes it.", plan.plan_id, err)
        explained = _explained(failure, len(acked), len(plan.chunks), self.summary.stream)
        if explained is failure:
            raise failure
        raise explained from failure

    def _failed_tries(self, plan: Plan) -> int:
        """Record that this try of ``plan`` ended with a retryable StopChurn failure; how many tries did so."""
        try:
            return self.store.record_failed_try(plan.plan_id)
        except SnapshotError as err:  # the delivery's own failure is the one to report; this try is not counted
            log.warning("Could not record the failed try of event plan %s: %s", plan.plan_id, err)
            return 0

    def _commit(self, plan: Plan, version: str, rows: int, state: Mapping[str, Any]) -> None:
        self.store.commit(
            version,
            base_version=plan.base_version,
            kinds=dict(LEDGER_KINDS),
            key_columns=[KEY],
            rows=rows,
            plan_id=plan.plan_id,
            lock=self.lock,
            run={"run_key": self.options.run_key, "sent": self.summary.sent},
            state=state,
        )
        self.summary.ledger_keys = rows

    def _settle(self, plan: Plan) -> None:
        """The acknowledged keys join the ledger; the watermark stays where it was (see :func:`settle_event_plan`)."""
        settled = settle_event_plan(
            self.store, plan, lock=self.lock, run={"run_key": self.options.run_key, "sent": self.summary.sent}
        )
        if settled.committed:
            self.summary.ledger_keys = settled.ledger_keys
        self.summary.set_watermark(settled.watermark_ms)


# --- settling a plan -------------------------------------------------------------------------------------------
def is_event_plan(meta: Mapping[str, Any]) -> bool:
    """Whether a pending plan's meta is an event plan's (older event plans have no ``engine`` but a base state)."""
    return meta.get("engine") == "events" or ("base_state" in meta and "table_name" not in meta)


@dataclass
class EventSettled:
    """What settling an event plan did."""

    plan_id: str
    acknowledged_chunks: int
    total_chunks: int
    #: events of the acknowledged chunks, now in the ledger (never sent again)
    recorded_events: int = 0
    #: events of the other chunks: the next run reads the window again and sends those the source still returns
    unacknowledged_events: int = 0
    committed: bool = False
    ledger_keys: int = 0
    watermark_ms: int | None = None


def settle_event_plan(
    store: SnapshotStore, plan: Plan, *, lock: Any = None, run: Mapping[str, Any] | None = None
) -> EventSettled:
    """Commit what StopChurn acknowledged of an event plan and drop the rest.

    The keys of the acknowledged chunks join the ledger (they are never sent again); the watermark stays where it
    was before the plan, so the next run reads the same window again and sends the other events, re-planned from
    the source (a chunk that was sent but not acknowledged may then reach StopChurn twice). Nothing acknowledged:
    the plan is dropped. Crash-safe as a commit is: the ledger is written before ``CURRENT`` names it.

    :param lock: the stream's lock, held by the caller (checked before the commit).
    :param run: the run record kept in ``CURRENT`` (see ``SnapshotStore.commit``).
    """
    acked = store.acked(plan)
    result = EventSettled(plan.plan_id, len(acked), len(plan.chunks))
    total = plan.chunks[-1][1] if plan.chunks else 0
    result.recorded_events = sum(plan.chunks[c][1] - plan.chunks[c][0] for c in acked if c < len(plan.chunks))
    result.unacknowledged_events = total - result.recorded_events
    if plan.meta.get("plan_format") != EVENT_PLAN_FORMAT:
        store.discard_plan(plan)  # written by another version: its events are read from the source again
        return result
    base = _State.of_record(plan.meta["base_state"])
    result.watermark_ms = base.watermark_ms
    if not acked:
        store.discard_plan(plan)
        return result
    changes = store.read_changes(plan)
    mask = np.zeros(changes.height, dtype=bool)
    for chunk in acked:
        start, end = plan.chunks[chunk]
        mask[start:end] = True
    ledger = pl.concat([_ledger(store.read_committed()), changes.filter(pl.Series(mask)).select(KEY, WATERMARK)])
    version = store.write_snapshot(ledger)
    state = _State(base.watermark_ms, plan.meta["state"]["event_key"], base.covered_ms)
    store.commit(
        version,
        base_version=plan.base_version,
        kinds=dict(LEDGER_KINDS),
        key_columns=[KEY],
        rows=ledger.height,
        plan_id=plan.plan_id,
        lock=lock,
        run=run,
        state=state.record(),
    )
    store.delete_snapshot(plan.target_version)
    result.committed = True
    result.ledger_keys = ledger.height
    return result


def settle_pending_event_plan(store: SnapshotStore, *, holder: str, lock_ttl_s: float = 600.0) -> EventSettled | None:
    """Settle the stream's pending plan under its lock, as a run would (``stopchurn settle --stream``).

    Returns None when no plan is pending. A plan of another kind (a table's) or another brand is refused.
    """
    with store.lock(holder, ttl_s=lock_ttl_s) as lock, lock.heartbeat():
        plan = store.pending_plan()
        if plan is None:
            return None
        if not is_event_plan(plan.meta) or plan.meta.get("brand_id", store.brand_id) != store.brand_id:
            raise StopChurnConfigError(
                f"The pending plan in {store.location} is not an event plan of brand {store.brand_id}; nothing was "
                "changed."
            )
        return settle_event_plan(store, plan, lock=lock)


def _settled_after_tries(failure: DeliveryError, acked: int, chunks: int, stream: str) -> TransientDeliveryError:
    """The retryable failure that made a plan settle, with what was kept and what the next try does."""
    return TransientDeliveryError(
        f"StopChurn kept answering events of stream {stream!r} with a retryable error on "
        f"{SETTLE_AFTER_FAILED_TRIES} tries of the same plan: {str(failure).splitlines()[0]} The plan was settled: "
        f"{acked} of {chunks} chunks were acknowledged and recorded in the ledger (never sent again); the watermark "
        "did not move, so the next try reads the same window from the source again and sends the other events (a "
        "request that was sent but not acknowledged may reach StopChurn twice).",
        status=failure.status,
        attempts=failure.attempts,
    )


def _explained(failure: StopChurnError, acked: int, chunks: int, stream: str) -> StopChurnError:
    """A permanent failure with what was recorded and what happens next, in the events' terms."""
    recorded = (
        f"{acked} of {chunks} chunks were acknowledged and recorded in the ledger (they are never sent again); the "
        "watermark did not move, so the next run reads the same window and sends the rest."
    )
    if isinstance(failure, StopChurnRejectedError):
        return StopChurnRejectedError(
            f"StopChurn rejected events of stream {stream!r} (400): {failure.reason}. {recorded} Fix the source "
            "(an event name unknown to StopChurn, or a value of another type than its definition?).",
            reason=failure.reason,
            status=failure.status,
            attempts=failure.attempts,
        )
    if isinstance(failure, StopChurnPayloadTooLargeError):
        return StopChurnPayloadTooLargeError(
            f"StopChurn refused an event of stream {stream!r} as too large (413) even alone in a request. "
            f"{recorded} Shrink that event's value.",
            status=failure.status,
            attempts=failure.attempts,
        )
    return failure


__all__ = [
    "EVENT",
    "EVENTS_FOLDER",
    "FUTURE_MARGIN",
    "KEY",
    "MAX_LOOKBACK",
    "SETTLE_AFTER_FAILED_TRIES",
    "WATERMARK",
    "Encoded",
    "EventOptions",
    "EventPlan",
    "EventSender",
    "EventSettled",
    "EventSummary",
    "Window",
    "encode_events",
    "event_store",
    "is_event_plan",
    "make_event_plan",
    "run_events",
    "settle_event_plan",
    "settle_pending_event_plan",
]
