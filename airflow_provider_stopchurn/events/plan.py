"""Planning an event run: drop rows before the window, dated after the clock or delivered already; chunk the rest.

A plan is the events to send, encoded, in order, with the ledger to commit once they are all acknowledged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from airflow_provider_stopchurn.encode.chunks import bodies_bytes, plan_chunks
from airflow_provider_stopchurn.events.encode import EVENT, Encoded
from airflow_provider_stopchurn.events.ledger import KEY, WATERMARK, StreamState, Window, iso_ms, watermark_ceiling
from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.exceptions import SourceDataError, StopChurnConfigError

#: Version of the event plan files; a pending plan of another version is dropped (its events are read again).
EVENT_PLAN_FORMAT = 1


def is_event_plan(meta: Mapping[str, Any]) -> bool:
    """Whether a pending plan's meta is an event plan's (older event plans have no ``engine`` but a base state)."""
    return meta.get("engine") == "events" or ("base_state" in meta and "table_name" not in meta)


@dataclass
class EventPlan:
    """The events of one run still to send (in send order) and the ledger and state to commit after them."""

    events: pl.DataFrame
    chunks: list[tuple[int, int]]
    bytes: int
    target: pl.DataFrame
    state: StreamState
    duplicates: int = 0
    before_window: int = 0
    held_future: int = 0


def make_event_plan(
    encoded: Encoded,
    ledger: pl.DataFrame,
    state: StreamState,
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
            f"since {iso_ms(state.covered_ms if state.covered_ms is not None else state.watermark_ms)} (the lookback "
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
    after = StreamState(state.watermark_ms, encoded.key_columns, state.covered_ms)
    if options.watermark_column is not None and fresh.height:
        top = int(fresh.get_column(WATERMARK).max())  # type: ignore[arg-type]
        after.watermark_ms = top if state.watermark_ms is None else max(state.watermark_ms, top)
    if now_ms is not None and after.watermark_ms is not None:
        # never past the run's clock: a watermark in the future would put every later event before the window
        after.watermark_ms = min(after.watermark_ms, watermark_ceiling(now_ms))
    if options.watermark_column is not None and after.watermark_ms is not None:
        # the ledger is pruned to this bound below; what it pruned before stays forgotten, so a longer lookback or
        # a clock set back must not open the window below what the ledger still knows (that would resend)
        bound = after.watermark_ms - options.lookback_ms
        pulled_back = state.watermark_ms is not None and after.watermark_ms < state.watermark_ms
        if state.covered_ms is None or pulled_back:
            # pulled back by the run's clock: a clock that ran ahead and was corrected looks the same as one set
            # back, and losing the events after the clock is worse than sending some twice (see ledger.read_window)
            after.covered_ms = bound
        else:
            after.covered_ms = max(bound, state.covered_ms)
    target = _prune(pl.concat([ledger, fresh.select(KEY, WATERMARK)]), after, options)
    return EventPlan(fresh, chunks, bodies_bytes(sizes, chunks), target, after, duplicates, before_window, held)


def _prune(ledger: pl.DataFrame, state: StreamState, options: EventOptions) -> pl.DataFrame:
    """Keep only the keys a later read can return again (watermark >= the next window's start)."""
    if options.watermark_column is None or state.watermark_ms is None:
        return ledger
    return ledger.filter(pl.col(WATERMARK) >= state.watermark_ms - options.lookback_ms)


__all__ = ["EVENT_PLAN_FORMAT", "EventPlan", "is_event_plan", "make_event_plan"]
