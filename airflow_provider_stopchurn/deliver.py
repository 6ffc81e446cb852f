"""Sending a plan's chunks: a bounded pool of requests, 413 splitting, rejection bisection, one report.

:func:`deliver` posts the chunks still to send and calls ``on_ack(chunk, rejections)`` on the calling thread as
each is acknowledged, so the caller records the acknowledgement *together with* the rows StopChurn rejected inside
it before the chunk counts as delivered. The worker threads only send; every count is added up on the calling
thread into one :class:`DeliveryReport`.

A failure stops new requests, lets the ones in flight finish (their acknowledgements are recorded), and is
returned in the report rather than raised, so the caller can settle what StopChurn acknowledged first.

- **413** (body too large): the range is split in halves and both are sent in the same run; a single update
  over the limit is a permanent error naming its id.
- **400** under ``on_rejected_rows="quarantine"``: the range is bisected down to the rows StopChurn rejects; the
  rest is delivered and the chunk is acknowledged with its rejections. Under ``"fail"`` the run stops.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import polars as pl

from airflow_provider_stopchurn.encoding import chunk_bodies, chunk_body
from airflow_provider_stopchurn.exceptions import (
    StopChurnAuthError,
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
)

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Rejection:
    """One update StopChurn refused: its position in the plan, its ``id`` and StopChurn's reason."""

    position: int
    reason: str
    id: Any = None
    update: Any = None

    def record(self) -> dict[str, Any]:
        return {"position": self.position, "reason": self.reason, "id": self.id, "update": self.update}


@dataclass
class _Outcome:
    rejections: list[Rejection] = field(default_factory=list)
    requests: int = 0
    retries: int = 0


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

    @property
    def uncertain(self) -> set[int]:
        """Chunks sent but not acknowledged: StopChurn may have applied them, in whole or in part."""
        return self.started - set(self.acked)

    @property
    def rejections(self) -> list[Rejection]:
        return [r for chunk in sorted(self.acked) for r in self.acked[chunk]]


def update_id(updates: pl.Series, position: int) -> Any:
    """The row ``id`` of one encoded update (for messages)."""
    try:
        return _row_id(orjson.loads(updates[position]))
    except orjson.JSONDecodeError:
        return None


def _row_id(update: Any) -> Any:
    try:
        return update["data"]["data"].get("id")
    except (KeyError, TypeError, AttributeError):
        return None


class Window(Protocol):
    """Consecutive updates of a plan (``plan.Window``): ``updates[i]`` is update ``offset + i``."""

    @property
    def offset(self) -> int: ...
    @property
    def updates(self) -> pl.Series: ...
    @property
    def chunks(self) -> list[tuple[int, int]]: ...
    @property
    def bytes(self) -> int: ...


def deliver(
    windows: Iterable[Window],
    sender: Sender,
    options: DeliveryOptions,
    on_ack: Callable[[int, list[Rejection]], None],
    *,
    on_chunks: Callable[[int, list[tuple[int, int]]], None] | None = None,
    guard: Callable[[], None] | None = None,
) -> DeliveryReport:
    """Send every chunk of ``windows``, a window at a time; see the module docstring.

    :param on_ack: records an acknowledged chunk (its number in the plan) with its rejections, on this thread.
    :param on_chunks: records a window's chunk ranges (numbered from the first argument) before any is sent.
    :param guard: called before each request is started; an exception from it (the run lost its lock) stops
        the delivery like a failed request.
    """
    report = DeliveryReport()
    workers = max(1, options.max_concurrent_requests)
    windows = iter(windows)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stopchurn-send") as pool:
        while report.failure is None:
            try:  # encoding and chunking happen here, a window at a time
                window = next(windows, None)
                if window is None:
                    break
                if on_chunks is not None and window.chunks:
                    on_chunks(report.chunks, window.chunks)
            except BaseException as err:
                report.failure = err
                break
            first = report.chunks
            report.chunks += len(window.chunks)
            report.bytes += window.bytes
            _Sending(pool, workers, sender, options, report, on_ack, guard).window(window, first)
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

    def window(self, window: Window, first: int, todo: Sequence[int] | None = None) -> None:
        """Send the chunks of one window (only ``todo`` of them, if given); chunk ``first + i`` is its chunk ``i``."""
        sender, options, report, guard, workers = self.sender, self.options, self.report, self.guard, self.workers
        updates, offset = window.updates, window.offset
        local = [(a - offset, b - offset) for a, b in window.chunks]
        last_progress = time.monotonic()

        def send(index: int, body: bytes) -> _Outcome:
            start, end = local[index - first]
            outcome = _Outcome()
            _send_range(sender, updates, start, end, options, outcome, (index, report.chunks), body)
            outcome.rejections = [dataclasses.replace(r, position=r.position + offset) for r in outcome.rejections]
            return outcome

        pending: dict[Future[_Outcome], int] = {}
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
                index = first + nxt[0]
                report.started.add(index)
                pending[self.pool.submit(send, index, nxt[1])] = index
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                _collect(fut, pending.pop(fut), report, self.on_ack)
                if time.monotonic() - last_progress >= options.progress_interval_s:
                    last_progress = time.monotonic()
                    log.info(
                        "Delivered %d of %d chunks so far of %r.", len(report.acked), report.chunks, options.table_name
                    )


@dataclass(frozen=True)
class _Encoded:
    offset: int
    updates: pl.Series
    chunks: list[tuple[int, int]]
    bytes: int


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
        return report
    workers = max(1, options.max_concurrent_requests)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stopchurn-send") as pool:
        whole = _Encoded(0, updates, list(chunks), 0)
        _Sending(pool, workers, sender, options, report, on_ack, guard).window(whole, 0, todo)
    return report


def _collect(
    fut: Future[_Outcome], index: int, report: DeliveryReport, on_ack: Callable[[int, list[Rejection]], None]
) -> None:
    """Add one finished chunk to the report; record its acknowledgement, or keep the run's first failure."""
    try:
        outcome = fut.result()
    except _Failed as failed:
        report.requests += failed.outcome.requests
        report.retries += failed.outcome.retries
        if isinstance(failed.error, StopChurnAuthError) and failed.outcome.requests == 0:
            report.started.discard(index)  # refused before anything was read: surely not applied
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


class _Failed(Exception):
    """A range failed after some requests: carries the counts made so far."""

    def __init__(self, error: BaseException, outcome: _Outcome) -> None:
        super().__init__(str(error))
        self.error = error
        self.outcome = outcome


def _send_range(
    sender: Sender,
    updates: pl.Series,
    start: int,
    end: int,
    options: DeliveryOptions,
    outcome: _Outcome,
    where: tuple[int, int],
    body: bytes | None = None,
) -> None:
    """Send updates [start, end), splitting on 413 and bisecting rejections under the quarantine policy."""
    if body is None:
        body = chunk_body(updates, start, end)
    chunk, chunks = where
    try:
        result = sender.post_update_body(body)
    except StopChurnPayloadTooLargeError as err:
        outcome.requests += 1
        outcome.retries += max(int(getattr(err, "attempts", 1)) - 1, 0)
        if end - start == 1:
            raise _Failed(
                StopChurnPayloadTooLargeError(
                    f"StopChurn refused the update of id {update_id(updates, start)!r} of {options.table_name!r} "
                    f"as too large (413) even alone ({len(body)} bytes with its envelope). Shrink that row (drop "
                    "or truncate large columns); the chunks acknowledged before it were committed.",
                    status=err.status,
                    attempts=err.attempts,
                ),
                outcome,
            ) from None
        log.warning(
            "StopChurn answered 413 to chunk %d of %d (%d updates, %d bytes); sending it in halves.",
            chunk + 1,
            chunks,
            end - start,
            len(body),
        )
        _split(sender, updates, start, end, options, outcome, where)
        return
    except StopChurnRejectedError as err:
        outcome.requests += 1
        if options.on_rejected_rows == "fail":
            raise _Failed(
                StopChurnRejectedError(
                    f"StopChurn rejected chunk {chunk + 1} of {chunks} of {options.table_name!r} (400).\n"
                    f"Reason: {err.reason}\n"
                    f"The chunk held updates {start + 1}-{end}. The chunks acknowledged before it were committed; "
                    "nothing else of this plan counts as delivered.\n"
                    "Fix the rows in the source (the next run diffs again), or set on_rejected_rows='quarantine' "
                    "to deliver the other rows.",
                    reason=err.reason,
                    status=err.status,
                    attempts=err.attempts,
                ),
                outcome,
            ) from None
        if end - start == 1:
            update = orjson.loads(updates[start])
            outcome.rejections.append(Rejection(start, err.reason, _row_id(update), update))
            return
        _split(sender, updates, start, end, options, outcome, where)
        return
    except BaseException as err:
        raise _Failed(err, outcome) from None
    outcome.requests += 1
    outcome.retries += max(int(getattr(result, "attempts", 1)) - 1, 0)


def _split(
    sender: Sender,
    updates: pl.Series,
    start: int,
    end: int,
    options: DeliveryOptions,
    outcome: _Outcome,
    where: tuple[int, int],
) -> None:
    mid = (start + end) // 2
    _send_range(sender, updates, start, mid, options, outcome, where)
    _send_range(sender, updates, mid, end, options, outcome, where)


__all__ = [
    "DeliveryOptions",
    "DeliveryReport",
    "Rejection",
    "Sender",
    "Window",
    "deliver",
    "deliver_chunks",
    "update_id",
]
