"""The streamed worker path against the whole one: the same plans, target snapshots, updates and StopChurn tables.

A source of Arrow record batches is planned batch by batch (``update/stream.py``): spooled, diffed on keys and row
hashes, its target snapshot written as it is made. Every case here runs one sequence of sources twice, once with
``STOPCHURN_WORKER_STREAM=never`` (the whole path) and once streamed (``always``: these small tables would take
the whole path under ``auto``), each into its own store and sandbox, and
compares, run by run: the plan (target snapshot frame with dtypes, positions, encoded updates, counts, meta), the
request bodies sent, the summaries, the committed snapshots, the errors, and the sandbox tables. Batch layouts are
drawn at random: uneven and empty batches, a column that is integers in one batch and text in a later one (json),
NULLs, keys added, removed and changed, a key repeated inside a batch, dotted names, zoned timestamps, decimals.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pytest
from helpers_sync import BRAND, T0, TABLE, RecordingSender, make_client, options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.plan import RunPlan, make_plan
from airflow_provider_stopchurn.update.stream import STREAM_ABOVE_ENV, STREAM_ENV, StreamedPlan, plan_streamed
from airflow_provider_stopchurn.update.sync import canonical_source, run_sync

PARIS = pa.timestamp("us", tz="Europe/Paris")
DECIMAL = pa.decimal128(12, 2)


@dataclass
class Source:
    """One run's source: rows (dicts) cut into batches; ``text_from``: the batch from which ``v`` is text."""

    rows: list[dict[str, Any]]
    cuts: list[int]
    text_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def batches(self) -> list[pa.RecordBatch]:
        bounds = [0, *sorted(self.cuts), len(self.rows)]
        out = []
        for number, (start, end) in enumerate(itertools.pairwise(bounds)):
            text = self.text_from is not None and number >= self.text_from
            schema = pa.schema(
                [
                    ("id", pa.int64()),
                    ("v", pa.string() if text else pa.int64()),
                    ("name", pa.string()),
                    ("a.b", pa.float64()),
                    ("at", PARIS),
                    ("amount", DECIMAL),
                ]
            )
            part = [
                dict(r, v=None if r["v"] is None else (str(r["v"]) if text else r["v"])) for r in self.rows[start:end]
            ]
            out.append(pa.RecordBatch.from_pylist(part, schema=schema))
        return out

    def stream(self) -> Callable[[], Iterator[pa.RecordBatch]]:
        """The source as a SQL source hands it over: a callable returning a generator of batches."""
        batches = self.batches()

        def read() -> Iterator[pa.RecordBatch]:
            yield from batches

        return read


def _row(key: int, seed: int) -> dict[str, Any]:
    return {
        "id": key,
        "v": None if (key + seed) % 5 == 0 else key * 10 + seed,
        "name": None if (key * 7 + seed) % 6 == 0 else f"n{key}-{seed % 3}",
        "a.b": None if (key + seed) % 4 == 0 else (key + seed) / 4,
        "at": 1_700_000_000_000_000 + (key * 1_000_003 + seed % 2) * 1_000,
        "amount": None if key % 7 == 0 else Decimal(f"{key}.{(seed % 3) * 25:02d}"),
    }


@st.composite
def sources(draw: st.DrawFn) -> list[Source]:
    """Two or three runs' sources: keys added, removed and changed between them, each cut into random batches."""
    runs = []
    keys = draw(st.sets(st.integers(0, 60), min_size=0, max_size=25))
    for run in range(draw(st.integers(2, 3))):
        if run:
            gone = draw(st.sets(st.sampled_from(sorted(keys)), max_size=4)) if keys else set()
            keys = (keys - gone) | draw(st.sets(st.integers(0, 60), max_size=4))
        changed = draw(st.sets(st.integers(0, 60), max_size=6))
        ordered = draw(st.permutations(sorted(keys)))
        rows = [_row(k, run if k in changed else 0) for k in ordered]
        if rows and draw(st.integers(0, 9)) == 0:  # a key repeated (inside a batch or across batches)
            rows.insert(draw(st.integers(0, len(rows))), dict(rows[draw(st.integers(0, len(rows) - 1))]))
        cuts = draw(st.lists(st.integers(0, len(rows)), max_size=5))
        text_from = draw(st.one_of(st.none(), st.integers(0, len(cuts))))
        runs.append(Source(rows, cuts, text_from))
    return runs


@dataclass
class Side:
    """One path: its store, sandbox and the bodies it sent."""

    mode: str
    store: SnapshotStore
    sandbox: SandboxServer


def _comparable_plan(plan: RunPlan, store: SnapshotStore) -> dict[str, Any]:
    """What a plan sends and records: the target snapshot, positions, each update encoded, counts and meta.

    A plan that commits nothing (nothing changed, no baseline, no rewrite) has no target to compare: the whole path
    writes none, and the streamed path publishes none (the counts compared say both commit nothing)."""
    if not (plan.changes or plan.baseline or plan.rewrite):
        target = pl.DataFrame()
    else:
        target = store.read_snapshot(plan.target_version) if isinstance(plan, StreamedPlan) else plan.target
    opts = options(chunk_size=3)
    windows = [(w.offset, w.updates.to_list(), w.chunks, w.bytes) for w in plan.windows(opts, T0)]
    return {
        "target": target,
        "positions": plan.positions,
        "windows": windows,
        "counts": (plan.inserted, plan.updated, plan.deleted, plan.unchanged, plan.baseline, plan.rewrite),
        "kinds": plan.kinds,
        "meta": plan.meta,
        "schema_change": plan.schema_change,
    }


def _outcome(call: Callable[[], Any]) -> tuple[Any, tuple[str, str] | None]:
    try:
        return call(), None
    except StopChurnError as err:
        return None, (type(err).__name__, str(err))


def _assert_same_plans(
    source: Source, store: SnapshotStore, run_ms: int, monkeypatch: pytest.MonkeyPatch, mode: str, **kw: Any
) -> bool:
    """The streamed plan and the whole plan over the same committed snapshot are the same plan; whether the plan
    was streamed (else it fell back to the whole path, or both failed)."""
    monkeypatch.setenv(STREAM_ENV, mode)
    opts = options(chunk_size=3, **kw)
    committed = store.read_committed()
    whole, whole_error = _outcome(lambda: make_plan(canonical_source(source.stream()(), opts), committed, opts, run_ms))
    streamed, streamed_error = _outcome(lambda: plan_streamed(source.stream()(), store, opts, run_ms)[0])
    assert streamed_error == whole_error
    if whole is None:
        return False
    want, got = _comparable_plan(whole, store), _comparable_plan(streamed, store)
    assert_frame_equal(got.pop("target"), want.pop("target"))
    got_positions, want_positions = got.pop("positions"), want.pop("positions")
    assert (got_positions is None) == (want_positions is None)
    if want_positions is not None:
        assert_frame_equal(got_positions, want_positions)
    assert got == want
    if isinstance(streamed, StreamedPlan):
        store.delete_snapshot(streamed.target_version)  # planned only: no run names it
        return True
    return False


def _run_both(sides: list[Side], source: Source, run_ms: int, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> None:
    results = []
    for side in sides:
        monkeypatch.setenv(STREAM_ENV, side.mode)
        sender = RecordingSender(make_client(side.sandbox))
        opts = options(chunk_size=3, max_concurrent_requests=1, **kw)
        summary, error = _outcome(lambda: run_sync(source.stream(), side.store, sender, opts, run_ms=run_ms))  # noqa: B023
        counts = None
        if summary is not None:
            counts = {k: v for k, v in summary.as_dict().items() if k not in ("duration_s", "snapshot_uri")}
        results.append((error, counts, sender.bodies, side.sandbox.rows(BRAND, TABLE)))
        assert side.store.pending_plan() is None
    (whole_error, whole_counts, whole_bodies, whole_rows), (error, counts, bodies, rows) = results
    assert error == whole_error
    assert counts == whole_counts
    assert bodies == whole_bodies
    assert sorted(rows, key=repr) == sorted(whole_rows, key=repr)
    whole, streamed = (side.store.read_committed() for side in sides)
    assert (whole is None) == (streamed is None)
    if whole is not None and streamed is not None:
        assert_frame_equal(streamed.frame, whole.frame)
        assert (streamed.kinds, streamed.rows, streamed.row_hash) == (whole.kinds, whole.rows, whole.row_hash)


def _sides(factory: Callable[..., SandboxServer], root: Path, mode: str) -> list[Side]:
    return [Side(m, SnapshotStore(root / m, BRAND, TABLE), factory()) for m in ("never", mode)]


def _check_runs(
    runs: list[Source],
    factory: Callable[..., SandboxServer],
    monkeypatch: pytest.MonkeyPatch,
    mode: str = "always",
    **kw: Any,
) -> list[bool]:
    """Run ``runs`` on both paths, comparing them run by run; per run, whether its plan was streamed."""
    streamed = []
    with tempfile.TemporaryDirectory() as folder:
        sides = _sides(factory, Path(folder), mode)
        try:
            for number, source in enumerate(runs):
                streamed.append(_assert_same_plans(source, sides[0].store, T0 + number, monkeypatch, mode, **kw))
                _run_both(sides, source, T0 + number, monkeypatch, **kw)
        finally:
            for side in sides:
                side.sandbox.stop()
    return streamed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=sources(), policy=st.sampled_from(["fail", "update_all"]), above=st.sampled_from([None, 0, 600, 3000]))
def test_streamed_and_whole_paths_plan_write_and_send_the_same(
    runs: list[Source],
    policy: str,
    above: int | None,
    stopchurn_sandbox_factory: Callable[..., SandboxServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``above``: None streams from the first byte (``always``); a number streams once the batches held pass it
    (``auto``), so a source starts in memory and is spooled from a batch in its middle."""
    if above is not None:
        monkeypatch.setenv(STREAM_ABOVE_ENV, str(above))
    mode = "always" if above is None else "auto"
    kw: dict[str, Any] = {"on_schema_change": policy, "max_delete_fraction": 1.0}
    _check_runs(runs, stopchurn_sandbox_factory, monkeypatch, mode, **kw)


def _rows(keys: range, seed: int = 0) -> list[dict[str, Any]]:
    return [_row(k, seed) for k in keys]


#: name -> (the runs' sources, per run whether its plan streams: False where it fails or takes the whole path)
CASES = {
    # a first load in uneven batches, an empty one among them; then a churn of every kind of change
    "churn": (
        [Source(_rows(range(40)), [0, 7, 7, 30]), Source(_rows(range(5, 45), seed=1)[::-1], [3, 20])],
        [True, True],
    ),
    # integers, then text in a later batch: the column is json, its earlier batches retyped (first load and churn)
    "kind joined late": (
        [Source(_rows(range(30)), [10, 20], text_from=2), Source(_rows(range(2, 33), 2), [15], 1)],
        [True, True],
    ),
    # the kind changes between runs: a schema change, refused the same way
    "schema change": ([Source(_rows(range(20)), [5]), Source(_rows(range(20)), [5], text_from=1)], [True, False]),
    # a key twice inside one batch, then across two batches: the same error, nothing committed
    "repeated key": ([Source(_rows(range(10)), [4]), Source([*_rows(range(10)), _row(3, 0)], [])], [True, False]),
    "repeated key across batches": ([Source([*_rows(range(10)), _row(3, 1)], [10])], [False]),
    # every row deleted: the empty-source safeguard, as a schema-only batch
    "empty source": ([Source(_rows(range(10)), []), Source([], [])], [True, False]),
    "nothing changed": ([Source(_rows(range(12)), [6]), Source(_rows(range(12))[::-1], [1, 2])], [True, True]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_and_whole_paths_agree_on_each_case(
    case: str, stopchurn_sandbox_factory: Callable[..., SandboxServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, streamed = CASES[case]
    assert _check_runs(runs, stopchurn_sandbox_factory, monkeypatch) == streamed


@pytest.mark.parametrize("initial_load", ["send", "baseline"])
def test_a_first_load_streams_its_target_and_inserts(
    initial_load: str, stopchurn_sandbox_factory: Callable[..., SandboxServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [Source(_rows(range(25)), [9, 9, 18])]
    assert _check_runs(runs, stopchurn_sandbox_factory, monkeypatch, initial_load=initial_load) == [True]


def test_a_composite_key_with_an_id_of_its_own_moves_ids_the_same_way(
    stopchurn_sandbox_factory: Callable[..., SandboxServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Key ``(id, name)``: the source's ``id`` is not the whole key; ids moving between keys are reconciled."""
    first = Source(_rows(range(12)), [5])
    moved = Source([dict(r, name=f"n{r['id']}-x") if r["id"] % 3 == 0 else r for r in _rows(range(12))], [2, 8])
    for run in (first.rows, moved.rows):
        for r in run:
            r["name"] = r["name"] or "none"
    kw: dict[str, Any] = {"key_columns": ("id", "name"), "max_delete_fraction": 1.0}
    assert _check_runs([first, moved], stopchurn_sandbox_factory, monkeypatch, **kw) == [True, True]


def test_ids_changing_under_a_key_that_is_not_the_id_are_deleted_first_the_same_way(
    stopchurn_sandbox_factory: Callable[..., SandboxServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Key ``name`` beside an ``id`` column: a row whose id changed deletes its old id first (``deletes_first``)."""
    first = [dict(r, name=f"k{r['id']}") for r in _rows(range(15))]
    second = [dict(r, id=r["id"] + 100) if r["id"] % 4 == 0 else r for r in first[2:]]
    kw: dict[str, Any] = {"key_columns": ("name",), "max_delete_fraction": 1.0}
    runs = [Source(first, [7]), Source(second, [3, 3, 9])]
    assert _check_runs(runs, stopchurn_sandbox_factory, monkeypatch, **kw) == [True, True]


def test_a_small_batch_source_takes_the_whole_path_unless_told_always(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``auto`` a batch source streams only past ``STREAM_ABOVE_BYTES``; ``always`` streams it at once."""
    source = Source(_rows(range(10)), [4])
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    monkeypatch.delenv(STREAM_ENV, raising=False)
    plan, committed = plan_streamed(source.stream()(), store, options(), T0)
    assert committed is None
    assert not isinstance(plan, StreamedPlan)
    assert plan.target.height == 10
    monkeypatch.setenv(STREAM_ENV, "always")
    plan, _ = plan_streamed(source.stream()(), store, options(), T0)
    assert isinstance(plan, StreamedPlan)
    assert store.read_snapshot(plan.target_version).height == 10


def test_a_streamed_plan_holds_the_keys_and_the_changed_rows_not_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streamed churn keeps the key columns (and ``id``) and the changed rows; the target is on disk."""
    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    first = Source(_rows(range(2_000)), [500, 1_200])
    _baseline(store, first)
    churn = Source([_row(k, 1) if k % 100 == 0 else _row(k, 0) for k in range(1, 2_010)], [700])
    plan, _ = plan_streamed(churn.stream()(), store, options(), T0 + 1)
    assert isinstance(plan, StreamedPlan)
    assert plan.target.columns == ["id"]  # the whole path's target holds every column and the hashes
    assert (plan.inserted, plan.updated, plan.deleted) == (10, 19, 1)
    assert sum(part.frame.height for part in plan.parts) == plan.changes
    assert store.read_snapshot(plan.target_version).height == 2_009


def test_a_snapshot_written_frame_by_frame_is_all_or_nothing(tmp_path: Path) -> None:
    """A failure while the target is written (the source, the disk) leaves no file and no temporary file."""
    store = SnapshotStore(tmp_path, BRAND, TABLE)

    def frames() -> Iterator[Any]:
        yield pl.DataFrame({"id": [1, 2]})
        raise OSError("disk full")

    with pytest.raises(Exception, match="disk full"):
        store.write_snapshot_frames(frames())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    version, rows = store.write_snapshot_frames(iter([pl.DataFrame({"id": [1, 2]}), pl.DataFrame({"id": [3]})]))
    assert rows == 3
    assert store.read_snapshot(version).get_column("id").to_list() == [1, 2, 3]
    assert store.read_snapshot_slice(version, 1, 2).get_column("id").to_list() == [2, 3]


def _baseline(store: SnapshotStore, source: Source) -> None:
    """Record ``source`` as the committed snapshot (a streamed baseline: nothing sent)."""
    plan, _ = plan_streamed(source.stream()(), store, options(initial_load="baseline"), T0)
    assert isinstance(plan, StreamedPlan)
    store.commit(
        plan.target_version,
        base_version=None,
        kinds=plan.kinds,
        key_columns=plan.key_columns,
        rows=plan.target_rows,
        plan_id=None,
        row_hash=plan.meta["row_hash"],
    )


def _text_held(frame: pl.DataFrame) -> int:
    """Bytes of the buffers a frame's columns reference (shared ones included), as Arrow sees them."""
    return sum(
        buffer.size
        for column in frame.get_columns()
        for buffer in column.to_arrow(compat_level=pl.CompatLevel.newest()).buffers()
        if buffer is not None
    )


def test_changed_and_deleted_rows_hold_only_their_own_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows filtered from a batch (changes) or gathered from a row group (deletes) keep only their own text: sharing
    the batch's buffers kept every batch of the table in memory (2 GB at 10M rows)."""
    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    rows = [dict(_row(k, 0), name=f"{k:06d}" + "x" * 400) for k in range(3_000)]
    _baseline(store, Source(rows, [1_000, 2_000]))
    churned = [dict(r, name=r["name"] + "!") if r["id"] % 100 == 0 else r for r in rows if r["id"] % 100 != 1]
    plan, _ = plan_streamed(Source(churned, [900, 1_900]).stream()(), store, options(), T0 + 1)
    assert (plan.updated, plan.deleted) == (30, 30)
    frames = [part.frame for part in plan.parts]
    assert all(isinstance(frame, pl.DataFrame) for frame in frames)
    held = sum(_text_held(frame) for frame in frames if isinstance(frame, pl.DataFrame))
    assert held < 200_000  # 60 rows of about 500 bytes, not 3 batches of 400 KB


@pytest.mark.parametrize("kept", [True, False], ids=["the source keeps the key", "the source drops the key"])
def test_a_snapshot_holding_a_key_twice_is_planned_the_same_on_both_paths(
    kept: bool, tmp_path: Path, stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot an older version committed with a key on two rows: both paths pair the key with its first row,
    marked dirty (sent again), or delete it once; the streamed path matches keys before it reads the hashes."""
    monkeypatch.setenv(STREAM_ENV, "never")
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run_sync(Source(_rows(range(30)), [12]).stream(), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    committed = store.read_committed()
    assert committed is not None
    twice = pl.concat([committed.frame, committed.frame.filter(pl.col("id").is_in([4, 17])).reverse()])
    pointer = orjson.loads(store.backend.read_bytes("CURRENT") or b"{}")
    pointer.update(version=store.write_snapshot(twice), rows=twice.height)
    store.backend.write_bytes("CURRENT", orjson.dumps(pointer), durable=True)
    rows = _rows(range(2, 34), seed=1) if kept else [r for r in _rows(range(2, 34), seed=1) if r["id"] != 17]
    assert _assert_same_plans(Source(rows, [9, 20]), store, T0 + 1, monkeypatch, "always", max_delete_fraction=1.0)
