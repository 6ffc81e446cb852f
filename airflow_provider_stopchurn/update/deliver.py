"""Sending a plan's chunks, a window at a time, through a bounded pool of requests, into one report.

:func:`deliver` posts the chunks still to send and calls ``on_ack(chunk, rejections)`` on the calling thread as
each is acknowledged, so the caller records the acknowledgement *together with* the rows StopChurn rejected inside
it before the chunk counts as delivered. The worker threads only send; every count is added up on the calling
thread into one :class:`~airflow_provider_stopchurn.update.delivery_report.DeliveryReport`.

A failure stops new requests, lets the ones in flight finish (their acknowledgements are recorded), and is
returned in the report rather than raised, so the caller can settle what StopChurn acknowledged first. A chunk
refused with 400 (or 401, or 413 on its own) before any part of it was applied is not *uncertain*: StopChurn
applied nothing of it.

Each chunk is sent by ``bisection.py`` (413 splitting, rejection bisection, suspect chunks taken apart); the rows
sent apart and the failure counts kept per row are ``isolation.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import polars as pl

from airflow_provider_stopchurn.encode.chunks import chunk_bodies
from airflow_provider_stopchurn.exceptions import (
    DeliveryError,
    StopChurnAuthError,
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.update.bisection import (
    Health,
    Outcome,
    Range,
    RangeFailed,
    known_of,
    range_ids,
    send_range,
)
from airflow_provider_stopchurn.update.delivery_report import DeliveryReport, Rejection, first_line, id_text
from airflow_provider_stopchurn.update.isolation import Cut, Isolation, cut_window
from airflow_provider_stopchurn.update.window import Window

log = logging.getLogger(__name__)

#: Errors that say StopChurn applied nothing of the request.
_NOTHING_APPLIED = (StopChurnAuthError, StopChurnRejectedError, StopChurnPayloadTooLargeError)


class Sender(Protocol):
    """What the engine needs from a client: post one encoded body, raise on failure."""

    def post_update_body(self, body: bytes) -> Any: ...


class DeliveryOptions(Protocol):
    """The options a delivery reads (``SyncOptions`` has them; the event engine passes its own)."""

    @property
    def max_concurrent_requests(self) -> int: ...
    @property
    def progress_interval_s(self) -> float: ...
    @property
    def table_name(self) -> str: ...
    @property
    def on_rejected_rows(self) -> str: ...


def deliver(
    windows: Iterable[Window],
    sender: Sender,
    options: DeliveryOptions,
    on_ack: Callable[[int, list[Rejection]], None],
    *,
    on_chunks: Callable[[int, list[tuple[int, int]]], None] | None = None,
    guard: Callable[[], None] | None = None,
    isolation: Isolation | None = None,
    whole_windows: bool = False,
) -> DeliveryReport:
    """Send every chunk of ``windows``, a window at a time; see the module docstring.

    :param on_ack: records an acknowledged chunk (its number in the plan) with its rejections, on this thread.
    :param on_chunks: records a window's chunk ranges (numbered from the first argument) before any is sent.
    :param guard: called before each request is started; an exception from it (the run lost its lock) stops
        the delivery like a failed request.
    :param isolation: rows sent apart (``isolation.py``); None: none.
    :param whole_windows: after a window of deletes, send the next only if every delete was applied (a plan
        whose key columns changed type: its deletes of the old ids, then the new rows); otherwise stop with an
        error saying what was not applied.
    """
    report = DeliveryReport()
    workers = max(1, options.max_concurrent_requests)
    windows = iter(windows)
    health = Health(isolation.patience if isolation is not None else 0)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stopchurn-send") as pool:
        while report.failure is None:
            try:  # encoding and chunking happen here, a window at a time
                window = next(windows, None)
                if window is None:
                    report.complete = True
                    break
                cut = cut_window(window, isolation)
                if on_chunks is not None and cut.window.chunks:
                    on_chunks(report.chunks, cut.window.chunks)
            except BaseException as err:
                report.failure = err
                break
            first = report.chunks
            report.chunks += len(cut.window.chunks)
            report.bytes += cut.window.bytes
            _Sending(pool, workers, sender, options, report, on_ack, guard, health, partial=True).window(cut, first)
            if whole_windows and report.failure is None and _all_deletes(cut.window.updates):
                report.failure = _not_all_applied(report, range(first, report.chunks), options.table_name)
            # a sent window is let go before the next is encoded: only one window of update JSON is held
            del window, cut
    report.complete = report.complete and report.failure is None
    return report


def deliver_chunks(
    updates: pl.Series,
    chunks: Sequence[tuple[int, int]],
    todo: Sequence[int],
    sender: Sender,
    options: DeliveryOptions,
    on_ack: Callable[[int, list[Rejection]], None],
    *,
    guard: Callable[[], None] | None = None,
) -> DeliveryReport:
    """Send the chunks ``todo`` of a plan whose updates are all encoded already (the event route resumes this way)."""
    report = DeliveryReport(chunks=len(chunks))
    if not todo:
        report.complete = True
        return report
    workers = max(1, options.max_concurrent_requests)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stopchurn-send") as pool:
        whole = Window(0, updates, list(chunks), 0)
        _Sending(pool, workers, sender, options, report, on_ack, guard, Health()).window(Cut(whole), 0, todo)
    report.complete = report.failure is None
    return report


@dataclass
class _Sending:
    """The pool and callbacks of one delivery."""

    pool: ThreadPoolExecutor
    workers: int
    sender: Sender
    options: DeliveryOptions
    report: DeliveryReport
    on_ack: Callable[[int, list[Rejection]], None]
    guard: Callable[[], None] | None
    health: Health
    #: a chunk acknowledged in part before it failed is recorded with its unknown rows as transient (the update
    #: engines settle those as uncertain; the event engine records whole chunks only)
    partial: bool = False

    def window(self, cut: Cut, first: int, todo: Sequence[int] | None = None) -> None:
        """Send the chunks of one window (only ``todo`` of them, if given); chunk ``first + i`` is its chunk ``i``."""
        sender, options, report, guard, workers = self.sender, self.options, self.report, self.guard, self.workers
        window = cut.window
        updates, offset = window.updates, window.offset
        local = [(a - offset, b - offset) for a, b in window.chunks]
        last_progress = time.monotonic()
        for i, row_id in cut.alone.items():
            report.isolated[first + i] = row_id
        for rows in cut.watched.values():
            report.met.update(text for _, text in rows)

        def send(index: int, body: bytes) -> Outcome:
            start, end = local[index - first]
            outcome = Outcome()
            ctx = Range(
                sender.post_update_body,
                updates,
                options.table_name,
                options.on_rejected_rows,
                (index, report.chunks),
                self.health,
                index - first in cut.suspect,
            )
            try:
                send_range(ctx, start, end, outcome, body)
            except RangeFailed as failed:
                known_of(failed, updates, (start, end), offset, partial=self.partial)
                raise
            outcome.rejections = [dataclasses.replace(r, position=r.position + offset) for r in outcome.rejections]
            return outcome

        pending: dict[Future[Outcome], int] = {}
        numbers = list(range(len(local))) if todo is None else list(todo)
        bodies = chunk_bodies(updates, local, numbers, window=max(64, 8 * workers))
        while True:
            # one request first: a wrong key or a rejected first chunk then costs one request, not `workers`
            while report.failure is None and len(pending) < (workers if report.acked else 1):
                if guard is not None:
                    try:
                        guard()
                    except BaseException as err:
                        report.failure = err
                        break
                nxt = next(bodies, None)
                if nxt is None:
                    break
                if nxt[0] in cut.suspect and self.health.spent():
                    # the run took apart all it may: these rows wait for the next run, the others go on
                    report.skipped.update(range_ids(updates, *local[nxt[0]]))
                    continue
                index = first + nxt[0]
                report.started.add(index)
                pending[self.pool.submit(send, index, nxt[1])] = index
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                index = pending.pop(fut)
                _collect(fut, index, report, self.on_ack, cut.watched.get(index - first, ()), offset)
                if time.monotonic() - last_progress >= options.progress_interval_s:
                    last_progress = time.monotonic()
                    log.info(
                        "Delivered %d of %d chunks so far of %r.", len(report.acked), report.chunks, options.table_name
                    )


def _collect(
    fut: Future[Outcome],
    index: int,
    report: DeliveryReport,
    on_ack: Callable[[int, list[Rejection]], None],
    watched: Iterable[tuple[int, str]],
    offset: int,
) -> None:
    """Add one finished chunk to the report; record its acknowledgement, or keep the run's first failure."""
    try:
        outcome = fut.result()
    except RangeFailed as failed:
        report.requests += failed.outcome.requests
        report.retries += failed.outcome.retries
        if isinstance(failed.error, _NOTHING_APPLIED) and failed.outcome.applied == 0:
            report.started.discard(index)  # refused before any part of it was applied: surely not applied
        if failed.ids:
            reason = first_line(failed.error)
            report.failed.update(dict.fromkeys(failed.ids, reason))
        if failed.records is not None:  # acknowledged in part: recorded, its unknown rows uncertain
            try:
                on_ack(index, failed.records)
                report.acked[index] = failed.records
            except BaseException as err:
                report.failure = report.failure or err
        report.failure = report.failure or failed.error
        return
    except BaseException as err:  # keep the first failure; the others in flight finish
        report.failure = report.failure or err
        return
    report.requests += outcome.requests
    report.retries += outcome.retries
    try:
        on_ack(index, outcome.rejections)
    except BaseException as err:  # the store refused the record: stop sending
        report.failure = report.failure or err
        return
    report.acked[index] = outcome.rejections
    held = {r.position - offset for r in outcome.rejections if r.transient}
    for r in outcome.rejections:
        if r.transient:
            text = id_text(r.id)
            report.held.add(text)
            report.failed[text] = r.reason
    report.delivered.update(text for position, text in watched if position not in held)


def _all_deletes(updates: pl.Series) -> bool:
    """Whether every update of a window is a delete (the windows a plan sends before its new rows)."""
    return bool(updates.len()) and bool((updates.str.json_path_match("$.type") == "delete").all())


def _not_all_applied(report: DeliveryReport, chunks: range, table_name: str) -> DeliveryError | None:
    """The error of a window some of whose updates StopChurn refused, or did not confirm (held, or not sent);
    None when every update of it was applied."""
    records = [r for c in chunks for r in report.acked.get(c, ())]
    unsent = [c for c in chunks if c not in report.acked]
    if not records and not unsent:
        return None
    refused = sum(1 for r in records if not r.transient)
    message = (
        f"StopChurn did not apply {len(records)} deletes of old ids of {table_name!r}, whose key columns changed "
        f"type ({refused} refused, the others still failing or not sent), and {len(unsent)} chunks were not sent.\n"
        "The rows under the new key type are sent once every old id is deleted: the next run sends the old ids' "
        "deletes again. Refused ones are listed by `stopchurn rejected`."
    )
    if refused:
        return DeliveryError(message)
    return TransientDeliveryError(message, status=None)


__all__ = ["DeliveryOptions", "Sender", "deliver", "deliver_chunks"]
