"""The event run: lock, finish an unfinished plan, read and plan the new events, deliver, record. No Airflow import.

One run::

    lock (with a heartbeat) -> resume the plan an earlier try or a crashed run left (its unacknowledged chunks)
         -> read the source for the window [watermark - lookback, ...) -> encode one event per row
         -> drop rows older than the window, keys seen twice in the source and keys the ledger delivered already
         -> write the target ledger and the plan -> deliver (``update/deliver.py``), recording each acknowledged chunk
         -> commit the target ledger and the new watermark -> summary

Nothing acknowledged is ever sent again. A chunk that was sent but not acknowledged (its answer was lost: a
timeout, a dropped connection, a crash while it was in flight, an HTTP retry after a lost answer) *is* sent
again, because StopChurn has no idempotency key and no client can know whether it was applied: its events are
delivered at least once, every other event exactly once.

What a run keeps and the window it reads: :mod:`~airflow_provider_stopchurn.events.ledger`; how a plan that
StopChurn refused or kept failing is settled: :mod:`~airflow_provider_stopchurn.events.settle`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson
import pandas as pd
import polars as pl

from airflow_provider_stopchurn.api.client import fence_sender
from airflow_provider_stopchurn.encode.chunks import bodies_bytes
from airflow_provider_stopchurn.events.encode import EVENT, Encoded, encode_events
from airflow_provider_stopchurn.events.ledger import (
    KEY,
    LEDGER_KINDS,
    WATERMARK,
    StreamState,
    Window,
    committed_ledger,
    iso_ms,
    read_window,
)
from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.events.plan import EVENT_PLAN_FORMAT, EventPlan, make_event_plan
from airflow_provider_stopchurn.events.settle import settle_event_plan
from airflow_provider_stopchurn.events.summary import EventSummary
from airflow_provider_stopchurn.exceptions import (
    DeliveryError,
    SnapshotError,
    StopChurnConfigError,
    StopChurnError,
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.store import Plan, SnapshotStore
from airflow_provider_stopchurn.store.history import recorded_under_lock
from airflow_provider_stopchurn.update.deliver import deliver_chunks
from airflow_provider_stopchurn.update.delivery_report import Rejection

log = logging.getLogger(__name__)

#: After this many tries of one plan ended with StopChurn still answering a retryable error (5xx, 408, 429, a
#: timeout, a dropped connection, a 200 that is not its acknowledgement), the plan is settled: a chunk StopChurn
#: keeps failing must not hold back the stream, and the next read must see a source that was fixed meanwhile.
SETTLE_AFTER_FAILED_TRIES = 3


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
    :param store: the stream's state store (:func:`~airflow_provider_stopchurn.events.ledger.event_store`).
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
        with recorded_under_lock(store, options, kind="events", fields=summary.record_fields) as lock:
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


def _read(source: Source, window: Window, options: EventOptions, state: StreamState) -> Encoded:
    frame = source(window) if callable(source) else source
    return encode_events(frame, options, key_order=state.event_key)


def _dry_run(source: Source, store: SnapshotStore, options: EventOptions, summary: EventSummary, now_ms: int) -> None:
    """What a run would send now, with nothing sent or written: an unfinished plan counts as delivered."""
    committed = store.read_committed()
    state, ledger = StreamState.of(committed), committed_ledger(committed)
    pending = store.pending_plan(cleanup=False)
    if pending is not None and pending.meta.get("plan_format") == EVENT_PLAN_FORMAT:
        acked = store.acked(pending)
        summary.resumed_chunks = len(pending.chunks) - len(acked)
        ledger = store.read_snapshot(pending.target_version).select(KEY, WATERMARK)
        state = StreamState.of_record(pending.meta["state"])
    window = read_window(state, options, now_ms)
    plan = make_event_plan(_read(source, window, options, state), ledger, state, window, options, now_ms)
    _plan_counts(summary, plan, window)
    summary.sent = plan.events.height
    summary.samples = [orjson.loads(e) for e in plan.events.get_column(EVENT).head(5).to_list()]


def _plan_counts(summary: EventSummary, plan: EventPlan, window: Window) -> None:
    summary.duplicates += plan.duplicates
    summary.before_window += plan.before_window
    summary.held_future += plan.held_future
    summary.chunks += len(plan.chunks)
    summary.bytes += plan.bytes
    summary.since = None if window.since_ms is None else iso_ms(window.since_ms)
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
        state = StreamState.of(committed)
        window = read_window(state, self.options, self.now_ms)
        ledger = committed_ledger(committed)
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


__all__ = ["SETTLE_AFTER_FAILED_TRIES", "EventSender", "Source", "run_events"]
