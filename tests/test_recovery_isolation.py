"""Rows that sink their chunk on every run: a row StopChurn keeps failing with 5xx, rows it rejected before, and
the quarantine that names the rows still rejected.

Each case runs the public engine (``run_sync``) against the sandbox on 127.0.0.1: the sandbox's ``fail_ids``
answers 500 to every request holding a given row, on every try, as a server-side bug tied to one row would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from helpers_sync import (
    BRAND,
    TABLE,
    RecordingSender,
    assert_sandbox_matches,
    expected_rows,
    make_client,
    sandbox_rows,
)
from sync_world import N, table
from sync_world import QuarantiningWorld as World

from airflow_provider_stopchurn.exceptions import StopChurnRejectedError, TransientDeliveryError
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.update.isolation import SUSPECT_AFTER


@pytest.fixture
def world(stopchurn_sandbox_factory: Any, tmp_path: Path) -> Iterator[World]:
    w = World(stopchurn_sandbox_factory(record=True), tmp_path / "snapshots")
    w.run(table())
    yield w


def _others_match(sb: SandboxServer, frame: pd.DataFrame, but: set[int]) -> None:
    want = {k: v for k, v in expected_rows(frame).items() if k[1] not in but}
    got = {k: v for k, v in sandbox_rows(sb).items() if k[1] not in but}
    assert got == want


# --- item 4: a row StopChurn fails with 5xx on every try ----------------------------------------------------------
@pytest.mark.parametrize(
    ("chunk_size", "concurrency", "bad"),
    [
        pytest.param(5, 1, [3], id="one-row"),
        pytest.param(5, 3, [3], id="concurrent"),
        pytest.param(40, 1, [1], id="first-of-a-large-chunk"),
        pytest.param(40, 2, [1, 40], id="two-rows-in-both-halves"),
    ],
)
def test_a_row_failing_with_500_on_every_try_is_isolated_and_the_rest_delivered(
    world: World, chunk_size: int, concurrency: int, bad: list[int]
) -> None:
    changed = table(qty=np.arange(N) * 7)
    world.sb.fail_ids(bad)  # in the first chunk, which is sent first and alone
    errors: list[TransientDeliveryError] = []
    for _ in range(SUSPECT_AFTER + 1):  # the tries of one DAG run (the operator retries 3 times)
        with pytest.raises(TransientDeliveryError) as caught:
            world.run(changed, chunk_size=chunk_size, max_concurrent_requests=concurrency)
        errors.append(caught.value)
    # the try after SUSPECT_AFTER failed ones takes the chunk apart: every other row is delivered
    _others_match(world.sb, changed, set(bad))
    assert all(world.sb.table(BRAND, TABLE)[i]["qty"] == 3 * i for i in bad)  # still the old rows
    last = str(errors[-1])
    assert last.splitlines()[0].startswith(f"StopChurn kept failing the updates of {len(bad)} rows")
    assert f"ids {', '.join(map(str, bad))})" in last
    assert world.store.pending_plan() is None
    # while they keep failing, a run sends them alone (one request each), nothing else, and names them again
    recorder = RecordingSender(make_client(world.sb, max_retries=0))
    with pytest.raises(TransientDeliveryError, match=f"ids {bad[0]}"):
        world.run(changed, sender=recorder, chunk_size=chunk_size)
    assert [[u["data"]["data"]["id"] for u in orjson.loads(b)["data"]] for b in recorder.bodies] == [[i] for i in bad]
    # StopChurn recovers: the next run delivers them, and the table is whole
    world.sb.fail_ids([])
    summary = world.run(changed, chunk_size=chunk_size)
    assert summary.updated == len(bad)
    assert_sandbox_matches(world.sb, changed)
    assert world.run(changed).updated == 0
    assert world.store.read_row_failures() == {}


def test_an_outage_is_not_taken_apart(world: World) -> None:
    """Every request fails: after SUSPECT_AFTER tries a try makes a few probes, then stops as before."""
    changed = table(qty=np.arange(N) * 5)
    world.sb.fail_ids(range(1, N + 1))
    for _ in range(SUSPECT_AFTER):
        with pytest.raises(TransientDeliveryError):
            world.run(changed)
    before = world.sb.stats()["requests"]
    with pytest.raises(TransientDeliveryError, match="500"):
        world.run(changed, sender=make_client(world.sb, max_retries=0))
    assert world.sb.stats()["requests"] - before <= 5  # the probes, not a bisection of every chunk
    world.sb.fail_ids([])
    world.run(changed)
    assert_sandbox_matches(world.sb, changed)


# --- item 5: rows rejected before travel alone; a 400 applied nothing ----------------------------------------------
def test_rows_rejected_before_are_sent_in_requests_of_their_own(world: World) -> None:
    changed = table(qty=np.arange(N) * 11)
    world.sb.reject_ids([3, 22])
    first = world.run(changed)
    assert sorted(r["id"] for r in first.rejected) == [3, 22]
    again = changed.assign(v="again")  # every row changes: rows 3 and 22 are sent once more
    recorder = RecordingSender(make_client(world.sb))
    second = world.run(again, sender=recorder)
    assert sorted(r["id"] for r in second.rejected) == [3, 22]
    bodies = [[u["data"]["data"]["id"] for u in orjson.loads(b)["data"]] for b in recorder.bodies]
    # each known-rejected row goes alone, and no chunk of good rows is bisected (each row is sent once)
    assert [b for b in bodies if 3 in b or 22 in b] == [[3], [22]]
    assert sorted(i for b in bodies for i in b) == list(range(1, N + 1))
    _others_match(world.sb, again, {3, 22})
    world.sb.reject_ids([])
    world.run(again)
    assert_sandbox_matches(world.sb, again)


def test_a_chunk_refused_with_400_is_not_uncertain(world: World) -> None:
    """Under on_rejected_rows='fail' the refused chunk applied nothing: its rows keep their last delivered state,
    and a source that no longer changes a row does not send it again."""
    bad = table()
    bad.loc[bad["id"] <= 30, "v"] = "BAD"  # 30 updates, 6 chunks; StopChurn refuses the last one
    world.sb.reject_ids([30])
    with pytest.raises(Exception, match="rejected chunk 6 of 6"):
        world.run(bad, on_rejected_rows="fail")
    fixed = bad.copy()
    fixed.loc[fixed["id"] == 30, "v"] = "v30"  # the refused change is withdrawn
    world.sb.reject_ids([])
    recorder = RecordingSender(make_client(world.sb))
    summary = world.run(fixed, sender=recorder, on_rejected_rows="fail")
    assert sorted(u["data"]["data"]["id"] for u in recorder.updates()) == [26, 27, 28, 29]
    assert summary.updated == 4
    assert_sandbox_matches(world.sb, fixed)


# --- item 17: the quarantine holds the rows still rejected, and says where ----------------------------------------
def test_a_run_whose_only_change_is_rejected_again_reports_where_it_is(world: World) -> None:
    changed = table()
    changed.loc[changed["id"] == 3, "v"] = "BAD"
    world.sb.reject_ids([3])
    first = world.run(changed)
    assert first.quarantine_uri is not None
    second = world.run(changed)  # only row 3 differs, and StopChurn refuses it again
    assert second.quarantined == 1 and second.quarantine_uri is not None
    path = Path(second.quarantine_uri.removeprefix("file://"))
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [3]
    assert [r["id"] for r in world.store.read_quarantine()] == [3]


def test_rows_accepted_later_leave_the_quarantine_and_old_files_go(world: World) -> None:
    changed = table()
    changed.loc[changed["id"].isin([3, 4, 30]), "v"] = "BAD"
    world.sb.reject_ids([3, 4, 30])
    world.run(changed)
    assert sorted(r["id"] for r in world.store.read_quarantine()) == [3, 4, 30]
    world.sb.reject_ids([4])  # 3 and 30 are accepted now
    summary = world.run(changed)
    assert [r["id"] for r in world.store.read_quarantine()] == [4]
    assert summary.quarantine_uri is not None
    world.store.quarantine_retention_s = 0.0  # a store may keep older files for less than the default
    world.sb.reject_ids([])
    summary = world.run(changed)
    assert summary.quarantine_uri is None and world.store.read_quarantine() == []
    assert world.store.read_quarantine(all_files=True) == []  # only the newest (empty) file is left
    assert len(world.store.quarantine_files()) == 1
    assert_sandbox_matches(world.sb, changed)


def test_a_rejected_row_withdrawn_from_the_source_leaves_the_quarantine(world: World) -> None:
    changed = table()
    changed.loc[changed["id"] == 3, "v"] = "BAD"
    world.sb.reject_ids([3])
    world.run(changed)
    assert [r["id"] for r in world.store.read_quarantine()] == [3]
    summary = world.run(table())  # the source is back to what StopChurn holds: nothing to send
    assert summary.inserted + summary.updated + summary.deleted == 0
    assert world.store.read_quarantine() == []


def test_a_refused_chunk_split_on_413_before_stays_uncertain(world: World) -> None:
    """A chunk split on 413 whose second half is refused was applied in part: its rows stay uncertain, so a source
    that goes back to the old rows sends them again (nothing of the applied half is left behind)."""
    bad = table(v=[("x" * 200) + str(i) for i in range(N)])
    world.sb.set_faults(FaultConfig(max_body_bytes=1500))  # a chunk of 10 goes out in halves and quarters
    world.sb.reject_ids([10])
    with pytest.raises(StopChurnRejectedError):
        world.run(bad, chunk_size=10, on_rejected_rows="fail")
    assert world.sb.table(BRAND, TABLE)[1]["v"] == bad.loc[0, "v"]  # the first half was applied
    world.sb.reject_ids([])
    world.run(table(), chunk_size=10)  # the source goes back to what it was
    assert_sandbox_matches(world.sb, table())
