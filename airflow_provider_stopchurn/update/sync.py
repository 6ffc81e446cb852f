"""The sync engine's one entry point, :func:`run_sync`. No Airflow import.

One run::

    lock (with a heartbeat) -> settle any plan an earlier try left -> canonicalize the source
         -> plan (diff, schema policy, safeguards, encoding, chunks; plan.py) -> write the target snapshot and plan
         -> deliver (deliver.py), recording each acknowledgement with its rejections -> settle (settle.py)
         -> summary (and, however the run ends, a record in the store's history; history.py)

Every ending, success or failure, goes through the same :func:`~airflow_provider_stopchurn.update.settle.settle`: what
StopChurn acknowledged is committed, nothing else. A failure then surfaces as the run's error; the next run (or
task retry) diffs the current source, with the current options, against the settled snapshot, so fixing the
source or an option always takes effect and no failure needs a hand edit of the store. A crash leaves the plan
pending; the next run settles it first, from the acknowledgements recorded in the store.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from airflow_provider_stopchurn.api.client import fence_sender
from airflow_provider_stopchurn.api.contract import USER_TABLE, check_user_table, coerce_user_flags
from airflow_provider_stopchurn.exceptions import SafeguardError, SnapshotError, StopChurnConfigError
from airflow_provider_stopchurn.options import RejectPolicy, SchemaPolicy, SyncOptions
from airflow_provider_stopchurn.source.canonical import Source, canonicalize_source, parse_json_columns
from airflow_provider_stopchurn.source.frame import Canonical
from airflow_provider_stopchurn.store import Plan, SnapshotStore
from airflow_provider_stopchurn.store.history import SUMMARY_FIELDS, recorded_under_lock
from airflow_provider_stopchurn.update.deliver import Sender, deliver
from airflow_provider_stopchurn.update.delivery_report import DeliveryReport, Rejection
from airflow_provider_stopchurn.update.diff import ROW_HASH
from airflow_provider_stopchurn.update.isolation import held_error, isolation_for, next_failures, still_rejected
from airflow_provider_stopchurn.update.plan import RunPlan, approval, make_plan, schema_changes
from airflow_provider_stopchurn.update.settle import Settled, commit_unsent, preview, settle
from airflow_provider_stopchurn.update.stream import StreamedPlan, plan_streamed, streams
from airflow_provider_stopchurn.update.window import Window

log = logging.getLogger(__name__)


@dataclass
class SyncSummary:
    """What the run delivered; ``as_dict()`` is what the operator returns (and Airflow puts in XCom).

    The scope of each count (the documentation's table "What a run reports", docs/update-operator.md, says the same):

    - ``inserted`` / ``updated`` / ``deleted``: updates StopChurn acknowledged for this DAG run (``run_key``): in
      this try, in plans of its earlier tries settled now, and (read from the run record kept with the snapshot)
      in earlier tries that committed. Rows StopChurn rejected are not counted (``quarantined``). Without a
      ``run_key``: this call only.
    - ``unchanged``: rows of the source that this DAG run neither inserted nor updated: this try's unchanged rows
      less those an earlier try delivered (exact when the source did not change between tries).
    - ``settled_chunks``: acknowledged chunks of this DAG run's earlier tries (committed then, or settled now).
    - ``settled_from_other_runs``: what this run settled of a plan another run left (a killed run, another DAG
      run, or without a ``run_key`` any earlier call): ``plans``, ``chunks``, ``inserted``, ``updated``,
      ``deleted``, ``rejected``; counted there only, never in the counts above. ``{}`` when none.
    - ``chunks`` / ``bytes`` / ``requests`` / ``retries``: this try's own delivery (``retries``: HTTP retries).
    - ``quarantined`` / ``rejected``: rows StopChurn rejected in this DAG run's deliveries settled by this try.
    - ``try_number``: the task's try (None outside Airflow).
    - ``never_sent`` / ``unacknowledged``: when this try's delivery stopped, the updates of its plan never sent
      (or refused whole before any was applied) vs sent without an acknowledgement (StopChurn may have applied
      them). The next run sends both again; 0 after a delivery that reached its end.
    - ``approved_deletes``: None, or the mass delete ``allow_large_changes`` let through: ``run_id``,
      ``deletes`` and ``rows_before`` (the snapshot's rows).
    """

    table_name: str
    brand_id: int
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    chunks: int = 0
    bytes: int = 0
    requests: int = 0
    retries: int = 0
    settled_chunks: int = 0
    settled_from_other_runs: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    quarantine_uri: str | None = None
    dry_run: bool = False
    baseline: bool = False
    schema_change: dict[str, Any] | None = None
    snapshot_uri: str = ""
    duration_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    try_number: int | None = None
    never_sent: int = 0
    unacknowledged: int = 0
    approved_deletes: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.dry_run:
            data.pop("samples")
        data["rejected"] = data["rejected"][:20]  # XCom stays small; the quarantine file holds them all
        return data

    def start_from(self, record: Mapping[str, Any] | None, run_key: str | None) -> None:
        """Count what earlier tries of the same run delivered (the run record kept with the snapshot)."""
        if run_key is None or not record or record.get("run_key") != run_key:
            return
        self.inserted += int(record.get("inserted", 0))
        self.updated += int(record.get("updated", 0))
        self.deleted += int(record.get("deleted", 0))
        self.settled_chunks += int(record.get("chunks", 0))

    def run_record(self, run_key: str | None, settled: Settled | None = None, chunks: int = 0) -> dict[str, Any] | None:
        """What the run delivered, with ``settled`` (not yet added) counted in: kept in ``CURRENT``."""
        if run_key is None:
            return None
        extra = settled or Settled("")
        return {
            "run_key": run_key,
            "inserted": self.inserted + extra.inserted,
            "updated": self.updated + extra.updated,
            "deleted": self.deleted + extra.deleted,
            "chunks": chunks + extra.acked_chunks,
        }

    def add_other(self, settled: Settled) -> None:
        """Count a plan another run left, settled by this one, apart from this run's own counts."""
        other = self.settled_from_other_runs
        for name, value in (
            ("plans", 1),
            ("chunks", settled.acked_chunks),
            ("inserted", settled.inserted),
            ("updated", settled.updated),
            ("deleted", settled.deleted),
            ("rejected", len(settled.rejections)),
        ):
            other[name] = other.get(name, 0) + value
        if settled.quarantine_uri:
            self.quarantine_uri = settled.quarantine_uri

    def add(self, settled: Settled) -> None:
        self.inserted += settled.inserted
        self.updated += settled.updated
        self.deleted += settled.deleted
        self.quarantined += len(settled.rejections)
        self.rejected.extend({k: r.get(k) for k in ("id", "reason")} for r in settled.rejections)
        if settled.quarantine_uri:
            self.quarantine_uri = settled.quarantine_uri

    def line(self) -> str:
        """One readable log line."""
        mode = " (dry run: nothing sent)" if self.dry_run else ""
        mode += " (baseline recorded, nothing sent)" if self.baseline else ""
        extra = f", settled {self.settled_chunks} chunks from an earlier try" if self.settled_chunks else ""
        other = self.settled_from_other_runs
        if other:
            extra += (
                f", settled another run's plan ({other['inserted']} inserted, {other['updated']} updated, "
                f"{other['deleted']} deleted; not counted above)"
            )
        extra += f", {self.quarantined} rows rejected" if self.quarantined else ""
        approved = self.approved_deletes
        if approved:
            extra += f", mass delete approved ({approved['deletes']} of {approved['rows_before']} rows)"
        attempt = f" (try {self.try_number})" if self.try_number is not None else ""
        return (
            f"StopChurn sync of brand {self.brand_id} table {self.table_name!r}{attempt}{mode}: "
            f"{self.inserted} inserted, {self.updated} updated, {self.deleted} deleted, {self.unchanged} unchanged; "
            f"{self.chunks} chunks, {self.bytes} bytes, {self.retries} HTTP retries{extra}; "
            f"{self.duration_s:.2f}s; snapshot {self.snapshot_uri}"
        )


def run_sync(
    source: Source,
    store: SnapshotStore,
    sender: Sender | None,
    options: SyncOptions,
    *,
    run_ms: int | None = None,
) -> SyncSummary:
    """Deliver the difference between ``source`` and the committed snapshot; see the module docstring.

    :param sender: posts request bodies (a ``StopChurnClient``); may be None only for a dry run.
    :param run_ms: the run's time (epoch ms), used as ``updatedAt`` of every change and ``createdAt`` of new keys
        when no timestamp columns are named.
    """
    started = time.monotonic()
    run_ms = run_ms if run_ms is not None else time.time_ns() // 1_000_000
    summary = SyncSummary(options.table_name, options.brand_id, dry_run=options.dry_run)
    summary.snapshot_uri = store.location
    summary.try_number = options.run_info.try_number
    if options.dry_run:
        _dry_run(source, store, options, summary, run_ms)
    else:
        if sender is None:
            raise StopChurnConfigError("A sender is required unless dry_run=True.")
        with recorded_under_lock(store, options, counts=lambda: summary_counts(summary)) as lock:
            pending = store.pending_plan()
            committed = store.read_committed()
            summary.start_from(committed.run if committed is not None else None, options.run_key)
            delivered_chunks = summary.settled_chunks
            if pending is not None:
                _check_owner(pending.meta, store, options)
                settle_counted(
                    summary,
                    options,
                    pending,
                    store.acks(pending),
                    delivered_chunks,
                    lambda acks, run: settle(store, pending, acks, lock=lock, run=run),
                )
            _plan_and_deliver(source, store, sender, options, summary, run_ms, lock)
    summary.duration_s = round(time.monotonic() - started, 3)
    log.info("%s", summary.line())
    return summary


def settle_counted(
    summary: SyncSummary,
    options: SyncOptions,
    pending: Plan,
    acks: Mapping[int, Sequence[Mapping[str, Any]]],
    delivered: int,
    settle_with: Callable[[Mapping[int, Sequence[Mapping[str, Any]]], Callable[[Settled], Any]], Settled],
    *,
    into: str = "",
    logger: logging.Logger = log,
) -> None:
    """Settle the plan an earlier run left (``settle_with(acks, run_record)``) and count it where it belongs.

    A plan of an earlier try of this DAG run (the same ``run_key``) counts in this run's summary; any other plan (a
    killed run, another DAG run, an earlier call without a ``run_key``) only in ``settled_from_other_runs``: its
    rejections are not this run's, and the rows it left rejected are sent again by this run's diff.
    """
    own = options.run_key is not None and pending.meta.get("run_key") == options.run_key
    logger.warning(
        "Settling the unfinished plan %s of %r%s (%s): %d of %d chunks were acknowledged.",
        pending.plan_id,
        options.table_name,
        f" into {into}" if into else "",
        "an earlier try of this run" if own else "left by another run, counted apart",
        len(acks),
        len(pending.chunks),
    )
    if own:
        summary.settled_chunks += len(acks)
        summary.add(settle_with(acks, lambda s: summary.run_record(options.run_key, s, delivered)))
    else:
        summary.add_other(settle_with(acks, lambda _: summary.run_record(options.run_key, chunks=delivered)))


def summary_counts(summary: SyncSummary) -> dict[str, Any]:
    """A summary's counts for its history record (``history.SUMMARY_FIELDS``)."""
    return {name: getattr(summary, name) for name in SUMMARY_FIELDS}


def _check_owner(meta: dict[str, Any], store: SnapshotStore, options: SyncOptions) -> None:
    if meta.get("brand_id") != options.brand_id or meta.get("table_name") != options.table_name:
        raise StopChurnConfigError(f"The pending plan in {store.location} belongs to another brand or table.")


def canonical_source(source: Source, options: SyncOptions) -> Canonical:
    """The source as the engine sends it: canonical columns, keys checked, the ``user`` table's contract checked."""
    canon = canonicalize_source(source, key_columns=options.key_columns, decimal_as_string=options.decimal_as_string)
    canon = parse_json_columns(canon, options.json_columns)
    if options.table_name == USER_TABLE:
        coerced, user_kinds = coerce_user_flags(canon.frame, canon.kinds)
        canon = Canonical(frame=coerced, kinds=user_kinds, key_columns=canon.key_columns)
        if coerced.height:
            check_user_table(coerced, user_kinds, nest_dotted_columns=options.nest_dotted_columns)
    return canon


def _plan_counts(summary: SyncSummary, plan: RunPlan, options: SyncOptions) -> None:
    # the rows an earlier try of this DAG run delivered are unchanged to this try's plan, but not to the DAG run
    summary.unchanged = max(0, plan.unchanged - summary.inserted - summary.updated)
    summary.schema_change = plan.schema_change
    summary.baseline = plan.baseline
    summary.approved_deletes = approval(plan.meta.get("approved_deletes"), options)


def _dry_run(source: Source, store: SnapshotStore, options: SyncOptions, summary: SyncSummary, run_ms: int) -> None:
    pending = store.pending_plan(cleanup=False)
    # a dry run sees the snapshot the pending plan settles to
    committed = store.read_committed() if pending is None else preview(store, pending, store.acks(pending))
    plan = make_plan(canonical_source(source, options), committed, options, run_ms)
    _plan_counts(summary, plan, options)
    summary.inserted, summary.updated, summary.deleted = plan.inserted, plan.updated, plan.deleted
    for window in plan.windows(options, run_ms):  # encoded and chunked as a run would, a window at a time
        summary.chunks += len(window.chunks)
        summary.bytes += window.bytes
        if len(summary.samples) < 5:
            summary.samples += [orjson.loads(u) for u in window.updates.head(5 - len(summary.samples)).to_list()]


def _plan_and_deliver(
    source: Source,
    store: SnapshotStore,
    sender: Sender,
    options: SyncOptions,
    summary: SyncSummary,
    run_ms: int,
    lock: Any,
) -> None:
    data = source() if callable(source) else source
    if streams(data, options):  # the target snapshot is written as the source is read
        plan, committed = plan_streamed(data, store, options, run_ms)
    else:
        canon = canonical_source(data, options)
        committed = store.read_committed(keep_keys=True)  # the key match takes the keys the file's check read
        plan = make_plan(canon, committed, options, run_ms)
    written = (plan.target_version, plan.target_rows) if isinstance(plan, StreamedPlan) else None
    try:  # planning (a streamed target's upload) can outlast the lease: a run that lost it writes no PLAN over
        lock.check()  # the new owner's, the ledger its settle reads
    except SnapshotError:
        if written is not None:
            with contextlib.suppress(SnapshotError):
                store.delete_snapshot(written[0])  # published, named by nothing
        raise
    _plan_counts(summary, plan, options)
    base_version = committed.version if committed is not None else None
    if plan.changes == 0:
        store.clear_quarantine()  # the source equals the snapshot: no row is left rejected or failing
        if plan.baseline or plan.rewrite:
            commit_unsent(
                store,
                plan,
                base_version=base_version,
                lock=lock,
                shape=options.shape(),
                run=summary.run_record(options.run_key, chunks=summary.settled_chunks),
                written=written,
            )
        return  # a streamed target equal to the snapshot was never published (update/stream.py)

    target_version, target_rows = (
        written if written is not None else (store.write_snapshot(plan.target), plan.target.height)
    )
    stored = store.write_plan(
        target_version=target_version,
        base_version=base_version,
        changes=plan.positions,
        chunks=[],
        meta={**plan.meta, "target_rows": target_rows, "total_updates": plan.changes},
    )
    deliver_and_settle(
        store,
        stored,
        plan.windows(options, run_ms),
        sender,
        options,
        summary,
        lock,
        lambda final, acks, uncertain: settle(
            store,
            final,
            acks,
            uncertain=uncertain,
            lock=lock,
            run=lambda s: summary.run_record(options.run_key, s, summary.settled_chunks),
            target=None if written is not None else plan.target,  # a streamed target is read when needed
        ),
    )


#: Settles a delivered plan: (the plan with every chunk recorded, its acknowledgements, the uncertain chunks).
SettlePlan = Callable[[Plan, dict[int, list[dict[str, Any]]], set[int]], Settled]


def deliver_and_settle(
    store: SnapshotStore,
    plan: Plan,
    windows: Iterable[Window],
    sender: Sender,
    options: SyncOptions,
    summary: SyncSummary,
    lock: Any,
    settle_plan: SettlePlan,
) -> None:
    """Deliver a stored plan's windows, recording chunks and acknowledgements in the store, then settle it (by
    either engine's ``settle_plan``) and :func:`conclude`. A settle that fails after a failed delivery leaves the
    plan for the next run and raises the delivery's failure."""
    stored = [plan]

    def record(chunk: int, rejections: list[Rejection]) -> None:
        store.ack(stored[0], chunk, [r.record() for r in rejections])

    def add_chunks(first: int, chunks: list[tuple[int, int]]) -> None:
        stored[0] = store.add_chunks(stored[0], first, chunks)

    # the lock fences every HTTP attempt, the client's retries included (TableLock.fence); the guard stops the
    # delivery before a chunk is started, the fenced sender before each attempt of it
    fenced = fence_sender(sender, lock.fence)
    request_s = float(getattr(fenced, "request_s", 0.0))
    rejected_before = store.read_quarantine()
    failures = store.read_row_failures()
    report = deliver(
        windows,
        fenced,
        options,
        record,
        on_chunks=add_chunks,
        guard=lambda: lock.fence(request_s),
        isolation=isolation_for((r.get("id") for r in rejected_before), failures),
        whole_windows=bool(stored[0].meta.get("keys_retyped")),
    )
    failures = next_failures(failures, report)
    try:  # hints for the next run: losing them only delays isolating a row
        lock.check()
        store.write_row_failures(failures)
        store.stage_quarantine(stored[0].plan_id, still_rejected(rejected_before, report))
    except SnapshotError as err:
        log.warning("Could not record the rows that failed or stay rejected: %s", err)
    summary.requests += report.requests
    summary.retries += report.retries
    summary.chunks = report.chunks
    summary.bytes = report.bytes
    acks = {chunk: [r.record() for r in rejections] for chunk, rejections in report.acked.items()}
    _count_unfinished(summary, stored[0], report, options)
    try:
        settled = settle_plan(stored[0], acks, report.uncertain)
    except Exception as err:
        if report.failure is None:
            raise
        log.error(
            "Could not settle plan %s after a failed delivery (%s); the next run settles it.", stored[0].plan_id, err
        )
        raise report.failure from err
    conclude(summary, settled, report.failure or held_error(report, failures, options.table_name), options)


def _count_unfinished(summary: SyncSummary, plan: Plan, report: DeliveryReport, options: SyncOptions) -> None:
    """Count what a delivery left undone (nothing when it reached its end): updates sent without an
    acknowledgement (StopChurn may have applied them) apart from those never sent (or refused whole, nothing of
    them applied). Both are sent again next run."""
    chunks = plan.chunks

    def size(chunk: int) -> int:
        return chunks[chunk][1] - chunks[chunk][0] if chunk < len(chunks) else 0

    held = sum(1 for records in report.acked.values() for r in records if r.transient)
    acknowledged = sum(size(c) for c in report.acked) - held
    summary.unacknowledged = sum(size(c) for c in report.uncertain) + held
    total = int(plan.meta.get("total_updates", chunks[-1][1] if chunks else 0))
    summary.never_sent = max(0, total - acknowledged - summary.unacknowledged)
    if not (summary.never_sent or summary.unacknowledged):
        return
    log.warning(
        "The delivery of %r stopped: %d updates acknowledged, %d sent without an acknowledgement (StopChurn may "
        "have applied them), %d never sent; the next run sends both again.",
        options.table_name,
        acknowledged,
        summary.unacknowledged,
        summary.never_sent,
    )


def conclude(summary: SyncSummary, settled: Settled, failure: BaseException | None, options: SyncOptions) -> None:
    """After a delivery was settled (by either engine): count it, then raise its failure or the rejection limit."""
    summary.add(settled)
    if failure is not None:
        raise failure
    if settled.rejections:
        log.warning(
            "StopChurn rejected %d rows of %r; they are in %s and will be tried again next run.",
            len(settled.rejections),
            options.table_name,
            settled.quarantine_uri,
        )
    if summary.quarantined > options.max_rejected_rows:
        raise SafeguardError(
            f"StopChurn rejected {summary.quarantined} rows of {options.table_name!r}, more than max_rejected_rows="
            f"{options.max_rejected_rows}.\n"
            "The other rows were delivered and committed. The rejected ones will be tried again next run; they are "
            f"in {summary.quarantine_uri}"
        )


__all__ = [
    "ROW_HASH",
    "RejectPolicy",
    "SchemaPolicy",
    "Sender",
    "SyncOptions",
    "SyncSummary",
    "canonical_source",
    "conclude",
    "deliver_and_settle",
    "run_sync",
    "schema_changes",
]
