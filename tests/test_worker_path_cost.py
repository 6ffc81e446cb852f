"""What a worker-path churn run costs beyond the change: no whole-table pass that only guards a rare case.

Each case runs the public engine (``run_sync``) against the sandbox on 127.0.0.1. Costs are counted as the calls a
run makes into polars (the library at the edge, observed with an autospec'd wrapper that still does the work), not
timed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import orjson
import polars as pl
import pytest
from helpers_sync import assert_sandbox_matches
from sync_world import SyncWorld, table

N = 2_000


@pytest.fixture
def world(stopchurn_sandbox_factory: Any, tmp_path: Path) -> Iterator[SyncWorld]:
    yield SyncWorld(stopchurn_sandbox_factory(record=True), tmp_path / "snapshots")


def _churned(n: int) -> Any:
    frame = table(n)
    frame.loc[frame["id"] % 50 == 7, "v"] = "changed"  # 40 updates
    return frame[frame["id"] % 100 != 3].reset_index(drop=True)  # 20 deletes


def test_a_churn_run_marks_no_repeated_keys_over_the_whole_table(world: SyncWorld) -> None:
    """The diff and the commit check that the snapshot holds each key once. Marking repeated keys
    (``is_duplicated``) over every row on every run cost a 1M-row churn run about a tenth of its time; a snapshot
    whose keys are unique is told by the diff's joins and by counting distinct keys instead."""
    world.run(table(N))
    heights: list[int] = []
    original = pl.DataFrame.is_duplicated

    def counted(frame: pl.DataFrame) -> pl.Series:
        heights.append(frame.height)
        return original(frame)

    with mock.patch.object(pl.DataFrame, "is_duplicated", autospec=True, side_effect=counted):
        summary = world.run(_churned(N))
    assert (summary.updated, summary.deleted) == (40, 20)
    assert [h for h in heights if h > N // 10] == [], f"is_duplicated over whole tables: {heights}"
    assert_sandbox_matches(world.sb, _churned(N))


def _hold_twice(world: SyncWorld, key: str) -> None:
    """Commit, as an older version could, a snapshot that holds ``key`` on two rows."""
    committed = world.store.read_committed()
    assert committed is not None
    twice = pl.concat(
        [committed.frame, committed.frame.filter(pl.col("id") == key).with_columns(pl.lit("old").alias("v"))]
    )
    version = world.store.write_snapshot(twice)
    current = world.store.backend.read_bytes("CURRENT")
    assert current is not None
    pointer = orjson.loads(current)
    pointer.update(version=version, rows=twice.height)
    world.store.backend.write_bytes("CURRENT", orjson.dumps(pointer), durable=True)


def test_a_key_held_twice_that_the_source_dropped_is_deleted_once_and_the_store_repaired(world: SyncWorld) -> None:
    """The diff finds a key held twice by the joins' heights; a repeated key the source no longer has is among the
    deleted keys only, and must still be deleted once and leave the snapshot holding each key once."""
    frame = table(40).assign(id=lambda f: f["id"].astype(str))
    world.run(frame)
    _hold_twice(world, "3")
    dropped = frame[frame["id"] != "3"].reset_index(drop=True)
    summary = world.run(dropped)
    assert (summary.inserted, summary.updated, summary.deleted) == (0, 0, 1)
    assert_sandbox_matches(world.sb, dropped)
    committed = world.store.read_committed()
    assert committed is not None
    assert not committed.frame.select("id").is_duplicated().any()
    assert world.run(dropped).requests == 0


def test_a_key_held_twice_that_the_source_keeps_is_sent_again(world: SyncWorld) -> None:
    """A repeated key the source still has makes the source's left join longer than the source: the key is sent
    again (its current state) and the next commit holds it once."""
    frame = table(40).assign(id=lambda f: f["id"].astype(str))
    world.run(frame)
    _hold_twice(world, "5")
    changed = frame.assign(v=lambda f: np.where(f["id"] == "9", "changed", f["v"]))
    summary = world.run(changed)
    assert summary.updated == 2
    assert_sandbox_matches(world.sb, changed)
    committed = world.store.read_committed()
    assert committed is not None
    assert not committed.frame.select("id").is_duplicated().any()
