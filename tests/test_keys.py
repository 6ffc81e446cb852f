"""Identities at StopChurn: retyped keys, ``id`` columns that are not the key, and options that change the shape
of what is sent. Each case runs the public engine (``run_sync``) against the sandbox on 127.0.0.1 and checks what
StopChurn holds after the last run: exactly the source, in one shape, with no old id left behind.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import polars as pl
import pytest
from helpers_sync import (
    FailAfter,
    FailOne,
    assert_sandbox_matches,
    make_client,
    plain_rows,
    sandbox_rows,
)
from sync_world import SyncWorld

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.exceptions import SafeguardError, SnapshotError, StopChurnError
from airflow_provider_stopchurn.options import SHAPE_OPTIONS
from airflow_provider_stopchurn.sandbox import FaultConfig

N = 40


class World(SyncWorld):
    def assert_unique_keys(self) -> None:
        committed = self.store.read_committed()
        assert committed is not None
        keys = committed.frame.select(list(committed.key_columns))
        assert not keys.is_duplicated().any(), "the committed snapshot holds a key twice"


@pytest.fixture
def world(stopchurn_sandbox_factory: Any, tmp_path: Path) -> Iterator[World]:
    yield World(stopchurn_sandbox_factory(record=True), tmp_path / "snapshots")


def int_table(n: int = N) -> pd.DataFrame:
    ids = np.arange(1, n + 1)
    return pd.DataFrame({"id": ids, "v": [f"v{i}" for i in ids]})


# --- item 6: a retyped key whose delivery stops part-way converges ---------------------------------------------
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("fail_after", [3, 8, 10])
def test_a_key_retyped_int_to_string_converges_after_an_interrupted_delivery(
    world: World, fail_after: int, workers: int
) -> None:
    """40 deletes of the int ids (8 chunks), then 40 inserts of the string ids: stopped after ``fail_after``
    acknowledged chunks. The clean runs after it leave StopChurn holding exactly the string ids."""
    world.run(int_table())
    new = int_table().assign(id=lambda f: f["id"].astype(str))
    opts = {"on_schema_change": "update_all", "allow_large_changes": True, "max_concurrent_requests": workers}
    with pytest.raises(StopChurnError):
        world.run(new, sender=FailAfter(make_client(world.sb), world.sb, fail_after), **opts)
    world.assert_unique_keys()
    world.sb.set_faults(FaultConfig())
    for _ in range(2):  # converges within the clean runs a schema change needs
        world.run(new, **opts)
        world.assert_unique_keys()
    assert_sandbox_matches(world.sb, new)
    again = world.run(new, **opts)
    assert again.inserted + again.updated + again.deleted == 0


def test_commit_refuses_a_snapshot_holding_a_key_twice(world: World) -> None:
    world.run(int_table())
    committed = world.store.read_committed()
    assert committed is not None
    frame = committed.frame
    twice = world.store.write_snapshot(pl.concat([frame, frame.head(1)]))
    with pytest.raises(SnapshotError, match=r"key .*twice") as err:
        world.store.commit(
            twice,
            base_version=committed.version,
            kinds=committed.kinds,
            key_columns=committed.key_columns,
            rows=frame.height + 1,
            plan_id=None,
        )
    assert str(err.value).splitlines()[0].endswith("nothing was committed.")
    after = world.store.read_committed()
    assert after is not None and after.version == committed.version
    changed = int_table().assign(v="w")
    world.run(changed)  # the next run goes on from the last good snapshot
    assert_sandbox_matches(world.sb, changed)


# --- item 7: an id column that is not the key ------------------------------------------------------------------
def keyed_table(ids: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"user_key": [f"k{i}" for i in range(len(ids))], "id": ids, "v": ["x"] * len(ids)})


def test_a_changed_id_deletes_the_old_id(world: World) -> None:
    first = keyed_table(list(range(100, 110)))
    world.run(first, key_columns=("user_key",))
    moved = keyed_table([*range(100, 103), 203, *range(104, 110)])  # k3: id 103 -> 203
    summary = world.run(moved, key_columns=("user_key",))
    assert_sandbox_matches(world.sb, moved, ("user_key",))
    assert summary.deleted == 1  # the old id, 103
    # ids swapped between two keys: both rows updated, no id left behind, nothing deleted
    swapped = moved.copy()
    swapped.loc[[0, 1], "id"] = [101, 100]
    swapped.loc[[0, 1], "v"] = "swapped"
    world.run(swapped, key_columns=("user_key",))
    assert_sandbox_matches(world.sb, swapped, ("user_key",))
    # an id taken over by a new key while its old key goes: one update of that id
    taken = swapped.iloc[1:].reset_index(drop=True)
    taken = pd.concat([taken, pd.DataFrame({"user_key": ["new"], "id": [101], "v": ["moved"]})], ignore_index=True)
    world.run(taken, key_columns=("user_key",))
    assert_sandbox_matches(world.sb, taken, ("user_key",))


def test_a_failed_delete_of_an_old_id_is_sent_again(world: World, stopchurn_sandbox_factory: Any) -> None:
    """The old id's delete fails while the row's new id is acknowledged in a request sent beside it: the next run
    must still delete the old id (a delete no base row carries is settled by holding back what follows it)."""
    first = keyed_table(list(range(100, 110)))
    world.run(first, key_columns=("user_key",))
    changed = keyed_table([*range(100, 105), 205, *range(106, 110)]).iloc[1:].reset_index(drop=True)  # k5: 105 -> 205
    failing = make_client(stopchurn_sandbox_factory(faults=FaultConfig(error_rate=1.0)))
    sender = FailOne(make_client(world.sb), failing, 105, delay_s=0.5)
    with pytest.raises(StopChurnError):
        world.run(changed, key_columns=("user_key",), chunk_size=1, max_concurrent_requests=3, sender=sender)
    world.run(changed, key_columns=("user_key",))
    assert_sandbox_matches(world.sb, changed, ("user_key",))


def test_an_id_held_by_two_rows_after_a_partial_swap_is_taken_over_once(world: World) -> None:
    keys = ("user_key",)
    first = keyed_table(list(range(100, 106)))
    world.run(first, key_columns=keys)
    swapped = first.copy()
    swapped.loc[[0, 2], "id"] = [102, 100]
    swapped.loc[1, "v"] = "changed"
    # k0 takes 102, k1's update fails, k2's is never sent: the snapshot holds 102 on k0 and on k2
    with pytest.raises(StopChurnError):
        world.run(swapped, key_columns=keys, chunk_size=1, sender=FailAfter(make_client(world.sb), world.sb, 1))
    world.sb.set_faults(FaultConfig())
    taken = pd.concat(
        [swapped.iloc[[1, 3, 4, 5]], pd.DataFrame({"user_key": ["new"], "id": [102], "v": ["took 102"]})],
        ignore_index=True,
    )
    summary = world.run(taken, key_columns=keys)
    assert summary.updated == 2  # k1 resent, and one update of id 102, not one per row that held it
    assert_sandbox_matches(world.sb, taken, keys)
    world.assert_unique_keys()


class DeleteLandsLast:
    """Delegates to a real client, but holds a body deleting ``row_id`` until a body inserting or updating the same
    id has been acknowledged (bounded wait): the order in which two concurrent requests may land."""

    def __init__(self, client: StopChurnClient, row_id: Any) -> None:
        self.client = client
        self.row_id = row_id
        self.written = threading.Event()
        self.held = 0

    def _ops(self, body: bytes) -> set[str]:
        return {u["type"] for u in orjson.loads(body)["data"] if u["data"]["data"]["id"] == self.row_id}

    def post_update_body(self, body: bytes) -> Any:
        ops = self._ops(body)
        if "delete" in ops:
            self.held += 1
            self.written.wait(5.0)  # bounded: in a fixed plan nothing else writes this id
        result = self.client.post_update_body(body)
        if ops & {"insert", "update"}:
            self.written.set()
        return result


def test_a_row_moving_between_tenants_is_never_deleted_by_its_old_key(world: World) -> None:
    tenants = ["eu"] * 20 + ["us"] * 20
    first = pd.DataFrame({"tenant": tenants, "id": np.arange(1, 41), "v": ["a"] * 40})
    keys = ("tenant", "id")
    world.run(first, key_columns=keys)
    moved = first.copy()
    moved.loc[moved["id"] == 5, "tenant"] = "us"  # (eu, 5) -> (us, 5): the same id at StopChurn
    moved = moved[moved["id"] != 1].reset_index(drop=True)  # a delete sent first, alone
    sender = DeleteLandsLast(make_client(world.sb), 5)
    summary = world.run(moved, key_columns=keys, chunk_size=1, max_concurrent_requests=4, sender=sender)
    assert_sandbox_matches(world.sb, moved, keys)
    assert summary.deleted == 1 and summary.inserted + summary.updated == 1
    assert sender.held == 0  # id 5 was never deleted


# --- item 8: options that change the shape of what is sent ----------------------------------------------------
def dotted_table(n: int = N, value: str = "x") -> pd.DataFrame:
    return pd.DataFrame({"id": np.arange(1, n + 1), "a.b": [f"{value}{i}" for i in range(n)]})


def flat_rows(frame: pd.DataFrame) -> dict[Any, Any]:
    return plain_rows({"id": int(i), "a.b": v} for i, v in zip(frame["id"], frame["a.b"], strict=True))


def test_shape_options_are_listed_once() -> None:
    assert "nest_dotted_columns" in SHAPE_OPTIONS


def test_turning_nest_dotted_columns_off_is_a_schema_change(world: World) -> None:
    frame = dotted_table()
    world.run(frame)
    assert sandbox_rows(world.sb)[("int", 1)] == {"id": 1, "a": {"b": "x0"}}
    with pytest.raises(SafeguardError, match="nest_dotted_columns"):
        world.run(frame, nest_dotted_columns=False)
    summary = world.run(frame, nest_dotted_columns=False, on_schema_change="update_all")
    assert summary.updated == N
    assert sandbox_rows(world.sb) == flat_rows(frame)
    assert world.run(frame, nest_dotted_columns=False).requests == 0


def test_an_interrupted_shape_change_resends_every_row_in_the_new_shape(world: World) -> None:
    frame = dotted_table()
    world.run(frame)
    changed = frame.copy()
    changed.loc[:4, "a.b"] = "y"  # five rows changed: the other 35 must be resent in the new shape too
    with pytest.raises(StopChurnError):
        world.run(
            changed,
            nest_dotted_columns=False,
            on_schema_change="update_all",
            sender=FailAfter(make_client(world.sb), world.sb, 3),
        )
    world.sb.set_faults(FaultConfig())
    world.run(changed, nest_dotted_columns=False, on_schema_change="update_all")
    assert sandbox_rows(world.sb) == flat_rows(changed)


def test_a_shape_option_without_effect_on_the_table_is_no_change(world: World) -> None:
    frame = int_table()
    world.run(frame)
    assert world.run(frame, nest_dotted_columns=False).requests == 0


def test_a_snapshot_an_older_version_committed_with_a_key_twice_is_repaired(world: World) -> None:
    """An older version could settle a retyped key into a snapshot holding it twice (``3`` cast to ``"3"`` beside
    the new ``"3"``); every later run then failed. Such a store now converges without a hand edit."""
    frame = int_table().assign(id=lambda f: f["id"].astype(str))
    world.run(frame)
    committed = world.store.read_committed()
    assert committed is not None
    twice = pl.concat(
        [committed.frame, committed.frame.filter(pl.col("id") == "3").with_columns(pl.lit("old").alias("v"))]
    )
    version = world.store.write_snapshot(twice)
    current = world.store.backend.read_bytes("CURRENT")
    assert current is not None
    pointer = orjson.loads(current)
    pointer.update(version=version, rows=twice.height)
    world.store.backend.write_bytes("CURRENT", orjson.dumps(pointer), durable=True)  # as the older version left it

    changed = frame.assign(v=lambda f: np.where(f["id"] == "7", "changed", f["v"]))
    summary = world.run(changed)
    assert summary.updated == 2  # the changed row, and the key held twice, sent again
    assert_sandbox_matches(world.sb, changed)
    world.assert_unique_keys()
