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

import logging
import time
from collections.abc import Callable, Sequence
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
from airflow_provider_stopchurn.options import SyncOptions

log = logging.getLogger(__name__)


class Sender(Protocol):
    """What the engine needs from a client: post one encoded body, raise on failure."""

    def post_update_body(self, body: bytes) -> Any: ...


@dataclass(frozen=True)
class Rejection:
    """One update StopChurn refused: its position in the plan, its ``id`` and StopChurn's reason."""

    position: int
    reason: str
    id: Any = None

    def record(self) -> dict[str, Any]:
        return {"position": self.position, "reason": self.reason, "id": self.id}


@dataclass
class _Outcome:
    rejections: list[Rejection] = field(default_factory=list)
    requests: int = 0
    retries: int = 0


@dataclass
class DeliveryReport:
    """What one delivery did: acknowledged chunks (with their rejections), requests, retries, the failure."""

    acked: dict[int, list[Rejection]] = field(default_factory=dict)
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
        return orjson.loads(updates[position])["data"]["data"].get("id")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None


def deliver(
    updates: pl.Series,
    chunks: Sequence[tuple[int, int]],
    todo: Sequence[int],
    sender: Sender,
    options: SyncOptions,
    on_ack: Callable[[int, list[Rejection]], None],
    *,
    guard: Callable[[], None] | None = None,
) -> DeliveryReport:
    """Send the chunks ``todo`` of ``updates``; see the module docstring.

    :param on_ack: records an acknowledged chunk with its rejections (called on this thread).
    :param guard: called before each request is started; an exception from it (the run lost its lock) stops
        the delivery like a failed request.
    """
    report = DeliveryReport()
    total = len(todo)
    if not total:
        return report
    workers = max(1, min(options.max_concurrent_requests, total))
    last_progress = time.monotonic()

    def send(index: int, body: bytes) -> _Outcome:
        start, end = chunks[index]
        outcome = _Outcome()
        _send_range(sender, updates, start, end, options, outcome, (index, len(chunks)), body)
        return outcome

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stopchurn-send") as pool:
        pending: dict[Future[_Outcome], int] = {}
        queue = chunk_bodies(updates, chunks, list(todo), window=max(64, 8 * workers))
        while True:
            # one request first: a wrong key or a rejected first chunk then costs one request, not `workers`
            while report.failure is None and len(pending) < (workers if report.acked else 1):
                if guard is not None:
                    try:
                        guard()
                    except BaseException as err:
                        report.failure = err
                        break
                nxt = next(queue, None)
                if nxt is None:
                    break
                report.started.add(nxt[0])
                pending[pool.submit(send, *nxt)] = nxt[0]
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                _collect(fut, pending.pop(fut), report, on_ack)
                if time.monotonic() - last_progress >= options.progress_interval_s:
                    last_progress = time.monotonic()
                    log.info("Delivered %d of %d chunks of %r.", len(report.acked), total, options.table_name)
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
    options: SyncOptions,
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
            outcome.rejections.append(Rejection(start, err.reason, update_id(updates, start)))
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
    options: SyncOptions,
    outcome: _Outcome,
    where: tuple[int, int],
) -> None:
    mid = (start + end) // 2
    _send_range(sender, updates, start, mid, options, outcome, where)
    _send_range(sender, updates, mid, end, options, outcome, where)


__all__ = ["DeliveryReport", "Rejection", "Sender", "deliver", "update_id"]
