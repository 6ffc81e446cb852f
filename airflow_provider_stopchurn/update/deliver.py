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
  rest is delivered and the chunk is acknowledged with its rejections. Under ``"fail"`` the run stops. A chunk
  refused with 400 (or 401, or 413 on its own) before any part of it was applied is not *uncertain*: StopChurn
  applied nothing of it.

**Isolation** (:class:`Isolation`, read from the store by the caller). Two kinds of rows would otherwise sink the
chunk they travel in on every run:

- rows StopChurn rejected before (the quarantine) and rows found failing alone (below) are cut into chunks of
  their own, one update per request, so a retry neither bisects a chunk of good rows again nor fails it;
- rows of a chunk that failed transiently (408, 429, 5xx, network, after the client's retries) on
  :data:`SUSPECT_AFTER` tries are *suspect*: a chunk holding one is bisected on a transient failure like a 400
  is, the rest is delivered, and an update that still fails alone is *held*: acknowledged with the chunk as
  uncertain (StopChurn may have applied it), so the next run sends it again, and reported by id. Both halves of
  a range are tried before either is split further: one bad row fails one half only, an outage fails both, so
  an outage stops the run after a few requests (:data:`PROBES`) instead of bisecting a whole chunk against a
  server that answers nothing. Several bad rows in one chunk look like an outage until a half gets through: each
  run that stopped so allows the next one split more and cuts their chunks finer (:data:`MAX_PATIENCE`), so they
  are taken apart too. A suspect update failing again alone is held without counting against the run's budget
  (it costs no request more), unless StopChurn answered nothing in the run; once the budget is spent, the other
  suspect chunks wait for the next run while the rest is sent.

The caller keeps the failure counts per row (``report.failed`` / ``report.delivered``, :func:`next_failures`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
import polars as pl

from airflow_provider_stopchurn.encode.chunks import bodies_bytes, chunk_bodies, chunk_body
from airflow_provider_stopchurn.exceptions import (
    DeliveryError,
    StopChurnAuthError,
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
    TransientDeliveryError,
)

log = logging.getLogger(__name__)

#: A row whose request failed transiently (after the client's own retries) on this many tries becomes suspect.
SUSPECT_AFTER = 3
#: Splits of a suspect range whose halves both failed that a run takes before it calls it an outage (plus one
#: per answer the run got, up to 8).
PROBES = 1
#: Transient failures of suspect ranges absorbed in one run at most (bounds the requests of a bad day).
MAX_HELD = 64
#: Extra splits with both halves failing that a run may take, one per try its suspect rows failed beyond
#: :data:`SUSPECT_AFTER` (several bad rows in one chunk look like an outage until a half gets through; a run that
#: stopped at the probe budget would otherwise stop at the same place on every later run).
MAX_PATIENCE = 4
#: Errors that say StopChurn applied nothing of the request.
_NOTHING_APPLIED = (StopChurnAuthError, StopChurnRejectedError, StopChurnPayloadTooLargeError)
_ID_PATH = "$.data.data.id"


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


def id_text(value: Any) -> str:
    """A row id as text, as ``json_path_match`` gives it (``1`` and ``"1"`` meet here: only used to pick rows)."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


@dataclass(frozen=True)
class Isolation:
    """Rows a delivery sends apart, by :func:`id_text` of their ``id``.

    :param alone: rows sent one per request (rejected before, or found failing alone).
    :param suspect: rows whose chunk is bisected on a transient failure.
    :param watched: rows with a failure count: the report says which were delivered (their count is dropped).
    :param patience: extra splits of suspect ranges whose halves both failed this delivery may take
        (:data:`MAX_PATIENCE`).
    """

    alone: frozenset[str] = frozenset()
    suspect: frozenset[str] = frozenset()
    watched: frozenset[str] = frozenset()
    patience: int = 0

    def __bool__(self) -> bool:
        return bool(self.alone or self.suspect or self.watched)


def isolation_for(rejected_ids: Iterable[Any], failures: Mapping[str, Mapping[str, Any]]) -> Isolation:
    """The isolation of a delivery: ids StopChurn rejected before, and the failure counts kept per row."""
    alone = {id_text(i) for i in rejected_ids if i is not None}
    alone |= {t for t, f in failures.items() if f.get("alone")}
    suspect = {t for t, f in failures.items() if int(f.get("failures", 0)) >= SUSPECT_AFTER}
    # each run that stopped at the probe budget counts one more try for the rows of the range: the next run
    # probes one split further, so rows failing together in one chunk are taken apart within a few runs
    tries = max((int(failures[t].get("failures", 0)) for t in suspect), default=SUSPECT_AFTER)
    patience = min(max(tries - SUSPECT_AFTER, 0), MAX_PATIENCE)
    return Isolation(frozenset(alone), frozenset(suspect), frozenset(failures), patience)


def next_failures(previous: Mapping[str, Mapping[str, Any]], report: DeliveryReport) -> dict[str, dict[str, Any]]:
    """The failure counts per row after a delivery: delivered rows drop out, rows that failed count one more try.

    After a delivery that reached its end, a row it never met is dropped too (the source no longer changes it).
    """
    kept = {t: dict(f) for t, f in previous.items() if t not in report.delivered}
    if report.complete:
        kept = {t: f for t, f in kept.items() if t in report.met or t in report.failed}
    for text, reason in report.failed.items():
        record = kept.setdefault(text, {"failures": 0})
        record["failures"] = int(record.get("failures", 0)) + 1
        record["reason"] = reason
    for text in report.held:
        kept[text]["alone"] = True
    return kept


def still_rejected(earlier: Sequence[Mapping[str, Any]], report: DeliveryReport) -> list[dict[str, Any]]:
    """The rows rejected before (quarantine records) that this delivery did not resolve.

    A row sent alone and acknowledged without a refusal was accepted: it leaves. A row refused again gets this
    plan's record instead. A row not met by a delivery that reached its end is no longer a change: it leaves. The
    others (not sent, or sent without an answer) stay.
    """
    outcome: dict[str, str] = {}
    for chunk, row_id in report.isolated.items():
        text = id_text(row_id)
        records = report.acked.get(chunk)
        if records is not None and not any(r.transient for r in records):
            outcome[text] = "refused" if records else "accepted"
        else:  # not sent, not answered, or held: it stays as it was
            outcome.setdefault(text, "met")
    kept = []
    for record in earlier:
        state = outcome.get(id_text(record.get("id")))
        if state in ("accepted", "refused") or (state is None and report.complete):
            continue
        kept.append(dict(record))
    return kept


def held_error(
    report: DeliveryReport, failures: Mapping[str, Mapping[str, Any]], table_name: str
) -> DeliveryError | None:
    """The error of a delivery that held updates (each still failing alone), naming their ids; None when none."""
    held = [r for r in report.rejections_all if r.transient]
    if not held:
        return None
    ids = sorted({repr(r.id) for r in held})
    tries = max(int(failures.get(id_text(r.id), {}).get("failures", 0)) for r in held)
    shown = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
    skipped = (
        f"{len(report.skipped)} more rows that failed on earlier tries were not sent in this run (it stops taking "
        f"failing rows apart after {MAX_HELD} failures); they are sent next run.\n"
        if report.skipped
        else ""
    )
    return TransientDeliveryError(
        f"StopChurn kept failing the updates of {len(ids)} rows of {table_name!r} (ids {shown}) with a retryable "
        f"error on {tries} tries.\n"
        f"Last answer: {held[-1].reason}\n"
        f"{skipped}"
        "Every other row was delivered and committed. These rows are sent again on every run, each in a request of "
        "its own, until StopChurn accepts them.",
        status=None,
    )


@dataclass
class _Outcome:
    rejections: list[Rejection] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    #: requests of the range that StopChurn acknowledged (a part of the chunk was applied)
    applied: int = 0
    #: the ranges those requests held (positions in the window)
    acked: list[tuple[int, int]] = field(default_factory=list)


class _Health:
    """Whether StopChurn answers at all in this run (shared by the sending threads).

    Bisecting a suspect range, a single bad row makes one half fail and the other succeed; both halves failing
    is what an outage looks like (or several bad rows). A run takes :data:`PROBES` such splits, one more per try
    its suspect rows failed beyond :data:`SUSPECT_AFTER` (``patience``, up to :data:`MAX_PATIENCE`) and one more
    per answer it got (up to 8), and :data:`MAX_HELD` absorbed failures in all; then it stops as any failed run
    does.
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
    isolation: Isolation | None = None,
    whole_windows: bool = False,
) -> DeliveryReport:
    """Send every chunk of ``windows``, a window at a time; see the module docstring.

    :param on_ack: records an acknowledged chunk (its number in the plan) with its rejections, on this thread.
    :param on_chunks: records a window's chunk ranges (numbered from the first argument) before any is sent.
    :param guard: called before each request is started; an exception from it (the run lost its lock) stops
        the delivery like a failed request.
    :param isolation: rows sent apart (see the module docstring); None: none.
    :param whole_windows: after a window of deletes, send the next only if every delete was applied (a plan
        whose key columns changed type: its deletes of the old ids, then the new rows); otherwise stop with an
        error saying what was not applied.
    """
    report = DeliveryReport()
    workers = max(1, options.max_concurrent_requests)
    windows = iter(windows)
    health = _Health(isolation.patience if isolation is not None else 0)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stopchurn-send") as pool:
        while report.failure is None:
            try:  # encoding and chunking happen here, a window at a time
                window = next(windows, None)
                if window is None:
                    report.complete = True
                    break
                cut = _cut(window, isolation)
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
    report.complete = report.complete and report.failure is None
    return report


@dataclass(frozen=True)
class _Encoded:
    offset: int
    updates: pl.Series
    chunks: list[tuple[int, int]]
    bytes: int


@dataclass
class _Cut:
    """A window with its chunks cut around isolated rows; chunk numbers are the window's own (from 0)."""

    window: Window
    #: chunk -> the id of the one row it holds (rows sent alone)
    alone: dict[int, Any] = field(default_factory=dict)
    #: chunks bisected on a transient failure
    suspect: set[int] = field(default_factory=set)
    #: chunk -> the watched rows it holds (local position, id text)
    watched: dict[int, list[tuple[int, str]]] = field(default_factory=dict)


def _cut(window: Window, isolation: Isolation | None) -> _Cut:
    """Cut the chunks of ``window`` so each row to send alone has a chunk of its own; find suspect chunks."""
    if not isolation or not window.chunks:
        return _Cut(window)
    offset, updates = window.offset, window.updates
    texts = updates.str.json_path_match(_ID_PATH)
    alone_at = np.flatnonzero(texts.is_in(list(isolation.alone)).fill_null(False).to_numpy())
    chunks = [(a - offset, b - offset) for a, b in window.chunks]
    bytes_ = window.bytes
    if len(alone_at):
        chunks = _split_around(chunks, alone_at)
    suspect_at = np.flatnonzero(texts.is_in(list(isolation.suspect)).fill_null(False).to_numpy())
    if isolation.patience and len(suspect_at):
        # each run stopped taking them apart cuts their chunks finer: rows failing together (a cluster deeper
        # than the probe budget) then meet good rows, whose answers let the run go on
        chunks = _finer(chunks, suspect_at, 1 << isolation.patience)
    if len(chunks) != len(window.chunks):
        bytes_ = bodies_bytes(updates.str.len_bytes().to_numpy(), chunks)
    starts = np.array([a for a, _ in chunks], dtype=np.int64)
    cut = _Cut(_Encoded(offset, updates, [(a + offset, b + offset) for a, b in chunks], bytes_))
    alone_set = {int(p) for p in alone_at}
    for i, (a, b) in enumerate(chunks):
        if b - a == 1 and a in alone_set:
            cut.alone[i] = _row_id(orjson.loads(updates[a]))
    cut.suspect = {int(c) for c in np.searchsorted(starts, suspect_at, side="right") - 1}
    watched_at = np.flatnonzero(texts.is_in(list(isolation.watched)).fill_null(False).to_numpy())
    for position, chunk in zip(watched_at, np.searchsorted(starts, watched_at, side="right") - 1, strict=True):
        cut.watched.setdefault(int(chunk), []).append((int(position), str(texts[int(position)])))
    return cut


def _finer(chunks: list[tuple[int, int]], suspect_at: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """``chunks`` with each one holding a position of ``suspect_at`` (sorted) cut into ``parts`` pieces."""
    starts = np.array([a for a, _ in chunks], dtype=np.int64)
    hit = set((np.searchsorted(starts, suspect_at, side="right") - 1).tolist())
    out: list[tuple[int, int]] = []
    for i, (a, b) in enumerate(chunks):
        step = max(1, -(-(b - a) // parts))
        out += [(s, min(s + step, b)) for s in range(a, b, step)] if i in hit else [(a, b)]
    return out


def _split_around(chunks: list[tuple[int, int]], alone_at: np.ndarray) -> list[tuple[int, int]]:
    """The ranges of ``chunks`` with every position of ``alone_at`` (sorted) in a range of its own, order kept."""
    out: list[tuple[int, int]] = []
    for a, b in chunks:
        start = a
        for p in alone_at[np.searchsorted(alone_at, a) : np.searchsorted(alone_at, b)]:
            if p > start:
                out.append((start, int(p)))
            out.append((int(p), int(p) + 1))
            start = int(p) + 1
        if start < b:
            out.append((start, b))
    return out


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
    health: _Health
    #: a chunk acknowledged in part before it failed is recorded with its unknown rows as transient (the update
    #: engines settle those as uncertain; the event engine records whole chunks only)
    partial: bool = False

    def window(self, cut: _Cut, first: int, todo: Sequence[int] | None = None) -> None:
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

        def send(index: int, body: bytes) -> _Outcome:
            start, end = local[index - first]
            outcome = _Outcome()
            ctx = _Range(sender, updates, options, (index, report.chunks), self.health, index - first in cut.suspect)
            try:
                _send_range(ctx, start, end, outcome, body)
            except _Failed as failed:
                _known_of(failed, updates, (start, end), offset, partial=self.partial)
                raise
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
                if nxt[0] in cut.suspect and self.health.spent():
                    # the run took apart all it may: these rows wait for the next run, the others go on
                    report.skipped.update(_ids(updates, *local[nxt[0]]))
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


def _ids(updates: pl.Series, start: int, end: int, only: np.ndarray | None = None) -> list[str]:
    """The id texts of updates ``[start, end)`` (``only``: at these offsets in it; none for bodies that are not
    row updates)."""
    texts = updates.slice(start, end - start).str.json_path_match(_ID_PATH)
    if only is not None:
        texts = texts.gather(only)
    return [str(t) for t in texts.drop_nulls().to_list()]


def _known_of(failed: _Failed, updates: pl.Series, span: tuple[int, int], offset: int, *, partial: bool) -> None:
    """Say on ``failed`` what is known of the rows of its chunk (``span``: positions in the window): the ids that
    failed transiently and, when a part was acknowledged (413 halves, bisection) and ``partial``, the records that
    let the chunk be recorded (its rejections, its unknown rows as transient), so the next run resends only the
    rows not acknowledged."""
    start, end = span
    unknown = _unknown(failed.outcome, start, end)
    if failed.outcome.applied and partial:
        failed.records = [dataclasses.replace(r, position=r.position + offset) for r in failed.outcome.rejections]
        reason = _first_line(failed.error)
        failed.records += [Rejection(start + offset + int(p), reason, transient=True) for p in unknown]
    if isinstance(failed.error, TransientDeliveryError):
        failed.ids = _ids(updates, start, end, unknown)


def _unknown(outcome: _Outcome, start: int, end: int) -> np.ndarray:
    """Offsets in ``[start, end)`` of the updates neither acknowledged nor refused alone by a request of the range."""
    known = np.zeros(end - start, dtype=bool)
    for a, b in outcome.acked:
        known[a - start : b - start] = True
    for r in outcome.rejections:
        known[r.position - start] = True
    return np.flatnonzero(~known)


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
        whole = _Encoded(0, updates, list(chunks), 0)
        _Sending(pool, workers, sender, options, report, on_ack, guard, _Health()).window(_Cut(whole), 0, todo)
    report.complete = report.failure is None
    return report


def _collect(
    fut: Future[_Outcome],
    index: int,
    report: DeliveryReport,
    on_ack: Callable[[int, list[Rejection]], None],
    watched: Iterable[tuple[int, str]],
    offset: int,
) -> None:
    """Add one finished chunk to the report; record its acknowledgement, or keep the run's first failure."""
    try:
        outcome = fut.result()
    except _Failed as failed:
        report.requests += failed.outcome.requests
        report.retries += failed.outcome.retries
        if isinstance(failed.error, _NOTHING_APPLIED) and failed.outcome.applied == 0:
            report.started.discard(index)  # refused before any part of it was applied: surely not applied
        if failed.ids:
            reason = _first_line(failed.error)
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


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


class _Failed(Exception):
    """A range failed after some requests: carries the counts made so far (and, when transient, its row ids)."""

    def __init__(self, error: BaseException, outcome: _Outcome) -> None:
        super().__init__(str(error))
        self.error = error
        self.outcome = outcome
        self.ids: list[str] = []
        #: when a part of the chunk was acknowledged: its rejections and, as transient, the rows not known
        self.records: list[Rejection] | None = None


@dataclass(frozen=True)
class _Range:
    """What sending a range of one chunk needs."""

    sender: Sender
    updates: pl.Series
    options: DeliveryOptions
    where: tuple[int, int]  # (chunk, chunks) for messages
    health: _Health
    suspect: bool = False


def _send_range(
    ctx: _Range, start: int, end: int, outcome: _Outcome, body: bytes | None = None, *, probe: bool = False
) -> None:
    """Send updates [start, end), splitting on 413, bisecting rejections under the quarantine policy and transient
    failures of a suspect chunk (``probe``: raise :class:`_Probe` on a transient failure of this very range)."""
    updates, options = ctx.updates, ctx.options
    if body is None:
        body = chunk_body(updates, start, end)
    chunk, chunks = ctx.where
    try:
        result = ctx.sender.post_update_body(body)
    except StopChurnPayloadTooLargeError as err:
        outcome.requests += 1
        outcome.retries += max(int(getattr(err, "attempts", 1)) - 1, 0)
        ctx.health.answer()
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
        _split(ctx, start, end, outcome)
        return
    except StopChurnRejectedError as err:
        outcome.requests += 1
        ctx.health.answer()
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
            raise _Failed(err, outcome) from None
        log.warning(
            "Chunk %d of %d of %r failed again (%s); it holds rows that failed on earlier tries: taking it apart.",
            chunk + 1,
            chunks,
            options.table_name,
            _first_line(err),
        )
        _take_apart(ctx, start, end, outcome, err)
        return
    except BaseException as err:
        raise _Failed(err, outcome) from None
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


def _take_apart(ctx: _Range, start: int, end: int, outcome: _Outcome, err: TransientDeliveryError) -> None:
    """A suspect range failed transiently: hold it if it is one update, else try both halves, then take apart the
    halves that failed (both failing counts against the outage budget)."""
    if end - start == 1:
        update = orjson.loads(ctx.updates[start])
        reason = _first_line(err)
        outcome.rejections.append(Rejection(start, reason, _row_id(update), update, transient=True))
        log.warning(
            "StopChurn keeps failing the update of id %r of %r: %s", _row_id(update), ctx.options.table_name, reason
        )
        return
    mid = (start + end) // 2
    failed: list[tuple[int, int, TransientDeliveryError]] = []
    for a, b in ((start, mid), (mid, end)):
        try:
            _send_range(ctx, a, b, outcome, probe=True)
        except _Probe as probe:
            failed.append((a, b, probe.error))
    for i, (_, _, error) in enumerate(failed):
        if not ctx.health.absorb(both=len(failed) == 2 and i == 0):
            raise _Failed(error, outcome)
    for a, b, error in failed:
        _take_apart(ctx, a, b, outcome, error)


def _split(ctx: _Range, start: int, end: int, outcome: _Outcome) -> None:
    mid = (start + end) // 2
    _send_range(ctx, start, mid, outcome)
    _send_range(ctx, mid, end, outcome)


__all__ = [
    "MAX_HELD",
    "MAX_PATIENCE",
    "PROBES",
    "SUSPECT_AFTER",
    "DeliveryOptions",
    "DeliveryReport",
    "Isolation",
    "Rejection",
    "Sender",
    "Window",
    "deliver",
    "deliver_chunks",
    "held_error",
    "id_text",
    "isolation_for",
    "next_failures",
    "still_rejected",
    "update_id",
]
