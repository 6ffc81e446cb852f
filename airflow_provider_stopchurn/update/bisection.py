"""Sending one chunk: halves on 413, bisection down to the rows StopChurn rejects, suspect chunks taken apart.

:func:`send_range` posts a range of a chunk's updates; a refusal sends its parts in the same run:

- **413** (body too large): the range is split in halves and both are sent; a single update over the limit is a
  permanent error naming its id.
- **400** under ``on_rejected_rows="quarantine"``: the range is bisected down to the rows StopChurn rejects; the
  rest is delivered and the chunk is acknowledged with its rejections. Under ``"fail"`` the run stops.
- a transient failure of a *suspect* chunk (``isolation.py``): both halves are tried, the failing ones taken
  apart down to the updates that still fail alone (held), within the run's budget (:class:`Health`).

Any other failure raises :class:`RangeFailed` with the counts made so far; ``deliver.py`` records what of the
chunk StopChurn acknowledged (:func:`known_of`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import polars as pl

from airflow_provider_stopchurn.encode.chunks import chunk_body
from airflow_provider_stopchurn.exceptions import (
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.update.delivery_report import ID_PATH, Rejection, first_line, row_id, update_id
from airflow_provider_stopchurn.update.isolation import MAX_HELD, PROBES

# the records keep the logger name of the module this code came from: users and tests filter on it
log = logging.getLogger("airflow_provider_stopchurn.update.deliver")


@dataclass
class Outcome:
    """What the requests of one chunk came to: the updates refused in it, the counts, what was acknowledged."""

    rejections: list[Rejection] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    #: requests of the range that StopChurn acknowledged (a part of the chunk was applied)
    applied: int = 0
    #: the ranges those requests held (positions in the window)
    acked: list[tuple[int, int]] = field(default_factory=list)


class Health:
    """Whether StopChurn answers at all in this run (shared by the sending threads).

    Bisecting a suspect range, a single bad row makes one half fail and the other succeed; both halves failing
    is what an outage looks like (or several bad rows). A run takes :data:`PROBES` such splits, one more per try
    its suspect rows failed beyond ``SUSPECT_AFTER`` (``patience``, up to ``MAX_PATIENCE``; both in
    ``isolation.py``) and one more per answer it got (up to 8), and :data:`MAX_HELD` absorbed failures in all;
    then it stops as any failed run does.
    """

    def __init__(self, patience: int = 0) -> None:
        self._lock = threading.Lock()
        self.answered = 0
        self.absorbed = 0
        self.both_failed = 0
        self.patience = patience
        self.singles = 0

    def answer(self) -> None:
        with self._lock:
            self.answered += 1

    def absorb(self, *, both: bool = False) -> bool:
        """Whether a transient failure of a suspect range (``both``: of both halves of one) is taken apart."""
        with self._lock:
            self.absorbed += 1
            self.both_failed += int(both)
            return self.absorbed <= MAX_HELD and self.both_failed <= self._budget()

    def held_alone(self) -> None:
        """A suspect update failed again alone (held, no request more)."""
        with self._lock:
            self.singles += 1

    def spent(self) -> bool:
        """Whether the run took apart all it may: later suspect chunks are not sent (the next run sends them).

        Held updates count only while StopChurn answered nothing in this run: :data:`MAX_HELD` of them in a row
        then look like an outage.
        """
        with self._lock:
            return (
                self.absorbed >= MAX_HELD
                or self.both_failed > self._budget()
                or (self.answered == 0 and self.singles >= MAX_HELD)
            )

    def _budget(self) -> int:
        return PROBES + self.patience + min(self.answered, 8)


class RangeFailed(Exception):
    """A range failed after some requests: carries the counts made so far (and, when transient, its row ids)."""

    def __init__(self, error: BaseException, outcome: Outcome) -> None:
        super().__init__(str(error))
        self.error = error
        self.outcome = outcome
        self.ids: list[str] = []
        #: when a part of the chunk was acknowledged: its rejections and, as transient, the rows not known
        self.records: list[Rejection] | None = None


@dataclass(frozen=True)
class Range:
    """What sending a range of one chunk needs."""

    #: posts one encoded body (the sender's ``post_update_body``), raising on failure
    post: Callable[[bytes], Any]
    updates: pl.Series
    table_name: str
    on_rejected_rows: str
    where: tuple[int, int]  # (chunk, chunks) for messages
    health: Health
    suspect: bool = False


def send_range(
    ctx: Range, start: int, end: int, outcome: Outcome, body: bytes | None = None, *, probe: bool = False
) -> None:
    """Send updates [start, end), splitting on 413, bisecting rejections under the quarantine policy and transient
    failures of a suspect chunk (``probe``: raise :class:`_Probe` on a transient failure of this very range)."""
    updates = ctx.updates
    if body is None:
        body = chunk_body(updates, start, end)
    chunk, chunks = ctx.where
    try:
        result = ctx.post(body)
    except StopChurnPayloadTooLargeError as err:
        outcome.requests += 1
        outcome.retries += max(int(getattr(err, "attempts", 1)) - 1, 0)
        ctx.health.answer()
        if end - start == 1:
            raise RangeFailed(
                StopChurnPayloadTooLargeError(
                    f"StopChurn refused the update of id {update_id(updates, start)!r} of {ctx.table_name!r} "
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
        _split(ctx, start, end, outcome)
        return
    except StopChurnRejectedError as err:
        outcome.requests += 1
        ctx.health.answer()
        if ctx.on_rejected_rows == "fail":
            raise RangeFailed(
                StopChurnRejectedError(
                    f"StopChurn rejected chunk {chunk + 1} of {chunks} of {ctx.table_name!r} (400).\n"
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
            outcome.rejections.append(Rejection(start, err.reason, row_id(update), update))
            return
        _split(ctx, start, end, outcome)
        return
    except TransientDeliveryError as err:
        outcome.requests += 1
        outcome.retries += max(int(getattr(err, "attempts", 1)) - 1, 0)
        if probe:
            raise _Probe(err) from None
        if ctx.suspect and end - start == 1:
            # one update of a suspect row that failed again: holding it costs no request more, so it is held and
            # does not count against the run's budget (which would otherwise stop every run before the rows after)
            ctx.health.held_alone()
            _take_apart(ctx, start, end, outcome, err)
            return
        if not ctx.suspect or not ctx.health.absorb():
            raise RangeFailed(err, outcome) from None
        log.warning(
            "Chunk %d of %d of %r failed again (%s); it holds rows that failed on earlier tries: taking it apart.",
            chunk + 1,
            chunks,
            ctx.table_name,
            first_line(err),
        )
        _take_apart(ctx, start, end, outcome, err)
        return
    except BaseException as err:
        raise RangeFailed(err, outcome) from None
    outcome.requests += 1
    outcome.applied += 1
    outcome.acked.append((start, end))
    outcome.retries += max(int(getattr(result, "attempts", 1)) - 1, 0)
    ctx.health.answer()


class _Probe(Exception):
    """A probed range failed transiently (its halves are then tried by the caller)."""

    def __init__(self, error: TransientDeliveryError) -> None:
        super().__init__(str(error))
        self.error = error


def _take_apart(ctx: Range, start: int, end: int, outcome: Outcome, err: TransientDeliveryError) -> None:
    """A suspect range failed transiently: hold it if it is one update, else try both halves, then take apart the
    halves that failed (both failing counts against the outage budget)."""
    if end - start == 1:
        update = orjson.loads(ctx.updates[start])
        reason = first_line(err)
        outcome.rejections.append(Rejection(start, reason, row_id(update), update, transient=True))
        log.warning("StopChurn keeps failing the update of id %r of %r: %s", row_id(update), ctx.table_name, reason)
        return
    mid = (start + end) // 2
    failed: list[tuple[int, int, TransientDeliveryError]] = []
    for a, b in ((start, mid), (mid, end)):
        try:
            send_range(ctx, a, b, outcome, probe=True)
        except _Probe as probe:
            failed.append((a, b, probe.error))
    for i, (_, _, error) in enumerate(failed):
        if not ctx.health.absorb(both=len(failed) == 2 and i == 0):
            raise RangeFailed(error, outcome)
    for a, b, error in failed:
        _take_apart(ctx, a, b, outcome, error)


def _split(ctx: Range, start: int, end: int, outcome: Outcome) -> None:
    mid = (start + end) // 2
    send_range(ctx, start, mid, outcome)
    send_range(ctx, mid, end, outcome)


def range_ids(updates: pl.Series, start: int, end: int, only: np.ndarray | None = None) -> list[str]:
    """The id texts of updates ``[start, end)`` (``only``: at these offsets in it; none for bodies that are not
    row updates)."""
    texts = updates.slice(start, end - start).str.json_path_match(ID_PATH)
    if only is not None:
        texts = texts.gather(only)
    return [str(t) for t in texts.drop_nulls().to_list()]


def known_of(failed: RangeFailed, updates: pl.Series, span: tuple[int, int], offset: int, *, partial: bool) -> None:
    """Say on ``failed`` what is known of the rows of its chunk (``span``: positions in the window): the ids that
    failed transiently and, when a part was acknowledged (413 halves, bisection) and ``partial``, the records that
    let the chunk be recorded (its rejections, its unknown rows as transient), so the next run resends only the
    rows not acknowledged."""
    start, end = span
    unknown = _unknown(failed.outcome, start, end)
    if failed.outcome.applied and partial:
        failed.records = [dataclasses.replace(r, position=r.position + offset) for r in failed.outcome.rejections]
        reason = first_line(failed.error)
        failed.records += [Rejection(start + offset + int(p), reason, transient=True) for p in unknown]
    if isinstance(failed.error, TransientDeliveryError):
        failed.ids = range_ids(updates, start, end, unknown)


def _unknown(outcome: Outcome, start: int, end: int) -> np.ndarray:
    """Offsets in ``[start, end)`` of the updates neither acknowledged nor refused alone by a request of the range."""
    known = np.zeros(end - start, dtype=bool)
    for a, b in outcome.acked:
        known[a - start : b - start] = True
    for r in outcome.rejections:
        known[r.position - start] = True
    return np.flatnonzero(~known)


__all__ = ["Health", "Outcome", "Range", "RangeFailed", "known_of", "range_ids", "send_range"]
