"""The diff on stored row hashes against the exact column-by-column diff, through the engine.

The engine compares a source with the committed snapshot by two 64-bit row hashes kept in the snapshot (reading
only keys, createdAt and hashes). When the hashes cannot be trusted (another polars version made them, or a
column's kind changed) it compares the columns themselves. Both must give the same plan.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers_sync import BRAND, T0, TABLE, Churn, RecordingSender, make_client, options
from hypothesis import given, settings
from test_diff import frame_pair, oracle

from airflow_provider_stopchurn.exceptions import SafeguardError
from airflow_provider_stopchurn.store import HASH_1, HASH_2, SnapshotStore
from airflow_provider_stopchurn.update.diff import ROW_HASH
from airflow_provider_stopchurn.update.sync import run_sync


@pytest.fixture
def sender(stopchurn_sandbox_factory: Any) -> RecordingSender:
    return RecordingSender(make_client(stopchurn_sandbox_factory()))


def _counts(summary: Any) -> tuple[int, int, int, int]:
    return summary.inserted, summary.updated, summary.deleted, summary.unchanged


def _forget_hash_function(store_root: Path) -> None:
    current = store_root / str(BRAND) / TABLE / "CURRENT"
    pointer = json.loads(current.read_text())
    pointer["row_hash"] = "polars-0.0.0-0123456789abcdef"  # as if another polars or CPU had written it
    current.write_text(json.dumps(pointer))


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_hash_diff_equals_the_exact_diff(tmp_path: Path, seed: int, stopchurn_sandbox_factory: Any) -> None:
    """Same churn, two stores: one diffs by hash, the other is forced onto the column-by-column path."""
    churn = Churn(seed, 800)
    stores = {name: SnapshotStore(tmp_path / name, BRAND, TABLE) for name in ("hash", "exact")}
    senders = {name: RecordingSender(make_client(stopchurn_sandbox_factory())) for name in stores}
    for name, store in stores.items():
        run_sync(churn.frame, store, senders[name], options(), run_ms=T0)
    for step in range(3):
        churn.step()  # rows come back shuffled
        results = {}
        for name, store in stores.items():
            if name == "exact":
                _forget_hash_function(tmp_path / name)
            results[name] = run_sync(churn.frame, store, senders[name], options(), run_ms=T0 + step + 1)
        assert _counts(results["hash"]) == _counts(results["exact"])
        assert sum(_counts(results["hash"])[:3]) > 0
    assert senders["hash"].bodies == senders["exact"].bodies


def test_a_single_changed_cell_is_seen(tmp_path: Path, sender: RecordingSender) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    frame = pd.DataFrame({"id": np.arange(1000), "name": [f"n{i}" for i in range(1000)], "score": np.arange(1000.0)})
    run_sync(frame, store, sender, options(), run_ms=T0)
    changed = frame.copy()
    changed.loc[417, "score"] = 417.000001
    summary = run_sync(changed, store, sender, options(), run_ms=T0 + 1)
    assert _counts(summary) == (0, 1, 0, 999)


def test_column_order_does_not_matter(tmp_path: Path, sender: RecordingSender) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    frame = pd.DataFrame({"id": [1, 2, 3], "a": ["x", "y", "z"], "b": [1.5, None, 2.5]})
    run_sync(frame, store, sender, options(), run_ms=T0)
    summary = run_sync(frame[["b", "id", "a"]], store, sender, options(), run_ms=T0 + 1)
    assert _counts(summary) == (0, 0, 0, 3)


def test_int_column_turned_float_by_nulls_is_not_a_change(tmp_path: Path, sender: RecordingSender) -> None:
    """pandas makes an int column float once it holds a NULL: the kinds differ, the values do not."""
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run_sync(pd.DataFrame({"id": [1, 2, 3], "n": [10, 20, 30]}), store, sender, options(), run_ms=T0)
    summary = run_sync(
        pd.DataFrame({"id": [1, 2, 3, 4], "n": [10.0, 20.0, 30.0, np.nan]}), store, sender, options(), run_ms=T0 + 1
    )
    assert _counts(summary) == (1, 0, 0, 3)


def test_snapshot_from_another_polars_version_is_diffed_exactly_and_rehashed(
    tmp_path: Path, sender: RecordingSender
) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    frame = pd.DataFrame({"id": np.arange(50), "v": np.arange(50)})
    run_sync(frame, store, sender, options(), run_ms=T0)
    _forget_hash_function(tmp_path)
    summary = run_sync(frame, store, sender, options(), run_ms=T0 + 1)
    assert _counts(summary) == (0, 0, 0, 50)
    committed = store.read_committed()
    assert committed is not None and committed.row_hash == ROW_HASH  # rewritten with this version's hashes
    assert {HASH_1, HASH_2} <= set(committed.frame.columns)


class _CollectingSender:
    """Stands in for StopChurn at the HTTP edge: accepts every body and keeps the updates."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []

    def post_update_body(self, body: bytes) -> Any:
        self.updates.extend(json.loads(body)["data"])
        return None


def test_a_change_set_larger_than_one_encoding_batch_arrives_whole(tmp_path: Path) -> None:
    n = 200_000 + 123  # the engine encodes 200k rows at a time
    sender = _CollectingSender()
    frame = pd.DataFrame({"id": np.arange(n)[::-1], "v": [f"v{i}" for i in range(n)]})
    summary = run_sync(frame, SnapshotStore(tmp_path, BRAND, TABLE), sender, options(chunk_size=5000), run_ms=T0)
    assert summary.inserted == n
    ids = [u["data"]["data"]["id"] for u in sender.updates]
    assert sorted(ids) == list(range(n)) and len(set(ids)) == n
    # every row kept its own values across the batch boundary (chunks may arrive in any order: 4 in flight)
    assert all(u["data"]["data"]["v"] == f"v{n - 1 - u['data']['data']['id']}" for u in sender.updates)


@settings(max_examples=120, deadline=None)
@given(frame_pair())
def test_engine_plan_matches_the_dict_oracle(pair: tuple[list, list, list[str], bool]) -> None:
    """Through the engine (hash diff, or the exact fallback when a column changed kind): a dry run's counts
    equal the dict-based oracle's, for random frames with NaN/None, composite keys and empty sides."""
    base_rows, new_rows, keys, int_as_float = pair
    columns = [*keys, "i", "f", "s"]

    def frame(rows: list[dict[str, Any]], *, float_ints: bool = False) -> pd.DataFrame:
        data = {c: pd.Series([r[c] for r in rows], dtype=object) for c in columns}
        if float_ints:  # what pandas does to an int column holding a NULL
            data["i"] = pd.Series([float("nan") if r["i"] is None else float(r["i"]) for r in rows], dtype="float64")
        return pd.DataFrame(data)

    with tempfile.TemporaryDirectory() as root:
        store = SnapshotStore(Path(root), BRAND, TABLE)
        opts = options(key_columns=tuple(keys), initial_load="baseline", allow_large_changes=True)
        run_sync(frame(base_rows), store, _CollectingSender(), opts, run_ms=T0)
        summary = run_sync(
            frame(new_rows, float_ints=int_as_float),
            store,
            None,
            dataclasses.replace(opts, dry_run=True),
            run_ms=T0 + 1,
        )

    # StopChurn gets null for NaN as for None ("missing equals missing"), so the oracle sees them alike
    def missing_as_none(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{c: None if isinstance(v, float) and v != v else v for c, v in r.items()} for r in rows]

    inserted, updated, deleted, unchanged = oracle(missing_as_none(base_rows), missing_as_none(new_rows), keys)
    assert (summary.inserted, summary.updated, summary.deleted) == (len(inserted), len(updated), len(deleted))
    assert summary.unchanged == unchanged


@pytest.fixture(scope="module")
def shared_sandbox() -> Any:
    from airflow_provider_stopchurn.sandbox import SandboxServer

    with SandboxServer(token="property-key") as sb:
        yield sb


_tables = itertools.count()


@settings(max_examples=60, deadline=None)
@given(frame_pair(), frame_pair())
def test_stopchurn_equals_the_source_after_every_run(shared_sandbox: Any, first: tuple, second: tuple) -> None:
    """Up to four sends of random tables (NaN/None, ints turned floats, empty tables, composite keys) with deletes
    allowed: after each, StopChurn's table is exactly the source, as JSON."""
    keys = first[2]
    table = f"prop{next(_tables)}"
    # successive versions of one table (the second pair's tables join when they are keyed alike)
    versions = [first[0], first[1]] + ([second[0], second[1]] if second[2] == keys else [])
    columns = [*keys, "i", "f", "s"]
    client = make_client(shared_sandbox)
    with tempfile.TemporaryDirectory() as root:
        store = SnapshotStore(Path(root), BRAND, table)
        opts = options(table_name=table, key_columns=tuple(keys), allow_large_changes=True, chunk_size=3)
        for n, rows in enumerate(versions):
            frame = pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in columns})
            run_sync(frame, store, client, opts, run_ms=T0 + n)
            expected = {}
            for r in rows:
                row = {c: None if isinstance(v, float) and v != v else v for c, v in r.items()}
                row["id"] = row["k1"] if len(keys) == 1 else f"{row['k1']}:{row['k2']}"
                expected[row["id"]] = row
            assert {r["id"]: r for r in shared_sandbox.rows(BRAND, table)} == expected


def test_a_key_whose_type_changes_is_schema_drift_not_a_mass_update(tmp_path: Path, sender: RecordingSender) -> None:
    """StopChurn does not promise that 1 and "1" are the same id: the run stops before sending anything."""
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run_sync(pd.DataFrame({"id": [1, 2, 3], "v": ["a", "b", "c"]}), store, sender, options(), run_ms=T0)
    sent = len(sender.bodies)
    with pytest.raises(SafeguardError, match=r"retyped id \(int -> string\)"):
        run_sync(pd.DataFrame({"id": ["1", "2", "3"], "v": ["a", "b", "c"]}), store, sender, options(), run_ms=T0)
    assert len(sender.bodies) == sent
