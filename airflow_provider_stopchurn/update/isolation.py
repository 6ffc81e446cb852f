"""Rows a delivery sends apart, and the failure counts per row kept between runs.

:class:`Isolation` is read from the store by the caller (:func:`isolation_for`). Two kinds of rows would otherwise
sink the chunk they travel in on every run:

- rows StopChurn rejected before (the quarantine) and rows found failing alone (below) are cut into chunks of
  their own (:func:`cut_window`), one update per request, so a retry neither bisects a chunk of good rows again nor
  fails it;
- rows of a chunk that failed transiently (408, 429, 5xx, network, after the client's retries) on
  :data:`SUSPECT_AFTER` tries are *suspect*: a chunk holding one is bisected on a transient failure like a 400
  is (``bisection.py``), the rest is delivered, and an update that still fails alone is *held*: acknowledged with
  the chunk as uncertain (StopChurn may have applied it), so the next run sends it again, and reported by id
  (:func:`held_error`). Both halves of a range are tried before either is split further: one bad row fails one
  half only, an outage fails both, so an outage stops the run after a few requests (:data:`PROBES`) instead of
  bisecting a whole chunk against a server that answers nothing. Several bad rows in one chunk look like an
  outage until a half gets through: each run that stopped so allows the next one split more and cuts their
  chunks finer (:data:`MAX_PATIENCE`), so they are taken apart too. A suspect update failing again alone is held
  without counting against the run's budget (it costs no request more), unless StopChurn answered nothing in the
  run; once the budget is spent, the other suspect chunks wait for the next run while the rest is sent.

The caller keeps the failure counts per row (``report.failed`` / ``report.delivered``, :func:`next_failures`) and
the rows still rejected (:func:`still_rejected`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from airflow_provider_stopchurn.encode.chunks import bodies_bytes
from airflow_provider_stopchurn.exceptions import DeliveryError, TransientDeliveryError
from airflow_provider_stopchurn.update.delivery_report import ID_PATH, DeliveryReport, id_text, row_id
from airflow_provider_stopchurn.update.window import Window

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
    for chunk, isolated_id in report.isolated.items():
        text = id_text(isolated_id)
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
class Cut:
    """A window with its chunks cut around isolated rows; chunk numbers are the window's own (from 0)."""

    window: Window
    #: chunk -> the id of the one row it holds (rows sent alone)
    alone: dict[int, Any] = field(default_factory=dict)
    #: chunks bisected on a transient failure
    suspect: set[int] = field(default_factory=set)
    #: chunk -> the watched rows it holds (local position, id text)
    watched: dict[int, list[tuple[int, str]]] = field(default_factory=dict)


def cut_window(window: Window, isolation: Isolation | None) -> Cut:
    """Cut the chunks of ``window`` so each row to send alone has a chunk of its own; find suspect chunks."""
    if not isolation or not window.chunks:
        return Cut(window)
    offset, updates = window.offset, window.updates
    texts = updates.str.json_path_match(ID_PATH)
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
    cut = Cut(Window(offset, updates, [(a + offset, b + offset) for a, b in chunks], bytes_))
    alone_set = {int(p) for p in alone_at}
    for i, (a, b) in enumerate(chunks):
        if b - a == 1 and a in alone_set:
            cut.alone[i] = row_id(orjson.loads(updates[a]))
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


__all__ = [
    "MAX_HELD",
    "MAX_PATIENCE",
    "PROBES",
    "SUSPECT_AFTER",
    "Cut",
    "Isolation",
    "cut_window",
    "held_error",
    "isolation_for",
    "next_failures",
    "still_rejected",
]
