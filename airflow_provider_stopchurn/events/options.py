"""``EventOptions``: every option that shapes an event run, defined and validated in one place (no I/O).

The checks every run's options share (``json_columns``, the chunk sizes, the lock's times, one error naming every
problem) are those of :mod:`airflow_provider_stopchurn.options`, as for the update's ``SyncOptions``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

from airflow_provider_stopchurn.options import (
    CHUNK_INTEGERS,
    LOCK_TTL_S,
    NO_RUN_INFO,
    RunInfo,
    checked_json_columns,
    integer_problems,
    refuse_invalid,
)

#: The instant epoch-millisecond watermarks count from (1970-01-01 UTC).
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: The longest ``lookback``: back from 1970 to the first datetime (0001-01-01); longer is beyond any datetime.
MAX_LOOKBACK = EPOCH - dt.datetime(1, 1, 1, tzinfo=dt.UTC)


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
        json_columns, json_problems = checked_json_columns(self.json_columns)
        object.__setattr__(self, "json_columns", json_columns)
        problems += json_problems
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
        problems += integer_problems(self, {**CHUNK_INTEGERS, "max_concurrent_requests": (1, ">= 1")})
        refuse_invalid("event", problems, lock_wait_s=self.lock_wait_s, lock_ttl_s=self.lock_ttl_s)

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


__all__ = ["EPOCH", "MAX_LOOKBACK", "EventOptions"]
