"""A hypothesis state machine over identities: ids that are not the key, keys that change type, shape options.

The table is keyed by ``(tenant, num)`` and carries its own ``id`` column, so between runs rows move between
tenants keeping their id, ids are swapped between rows or replaced by fresh ones, the key column ``num`` turns
from integers to strings and back, and ``nest_dotted_columns`` is turned over (the table has a dotted column).
Runs fail part-way at random (500s, dropped connections, lost acknowledgements, several requests in flight).
Whatever happened, one clean run leaves StopChurn holding exactly the source, by id, in the current shape, and
the committed snapshot holds each key once.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pandas as pd
import pytest
from fault_strategies import fault_configs
from helpers_machines import machine_settings, sandbox_and_store
from helpers_sync import T0, make_client, options, sandbox_rows
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from worker_paths import streamed

from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.sandbox import FaultConfig
from airflow_provider_stopchurn.update.sync import run_sync

KEYS = ("tenant", "num")
TENANTS = ("eu", "us")

faults = fault_configs(html_ok=False)


def expected(rows: list[dict[str, Any]], nest: bool, num_as_text: bool) -> dict[tuple[str, Any], dict[str, Any]]:
    """What StopChurn must hold, written out by hand (keyed like the sandbox: id type and id)."""
    out = {}
    for r in rows:
        num: Any = str(r["num"]) if num_as_text else r["num"]
        row = {"tenant": r["tenant"], "num": num, "id": r["id"], "v": r["v"]}
        row.update({"m": {"x": r["mx"]}} if nest else {"m.x": r["mx"]})
        out[("int", r["id"])] = row
    return out


class Identities(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sb, self.tmp, self.store = sandbox_and_store()
        self.rows: list[dict[str, Any]] = []
        self.next_num = 0
        self.next_id = 1000
        self.nest = True
        self.num_as_text = False
        self.opts: dict[str, Any] = {"chunk_size": 3, "max_concurrent_requests": 1}
        self.tick = 0

    def _new_row(self, tenant: str) -> dict[str, Any]:
        self.next_num += 1
        self.next_id += 1
        return {"tenant": tenant, "num": self.next_num, "id": self.next_id, "v": "new", "mx": self.next_num}

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows, columns=["tenant", "num", "id", "v", "mx"]).rename(columns={"mx": "m.x"})
        if self.num_as_text:
            frame["num"] = frame["num"].astype(str)
        return frame

    def _run(self) -> Any:
        self.tick += 1
        return run_sync(
            self.frame(),
            self.store,
            make_client(self.sb, max_retries=1),
            options(
                **self.opts,
                key_columns=KEYS,
                nest_dotted_columns=self.nest,
                on_schema_change="update_all",
                allow_large_changes=True,
            ),
            run_ms=T0 + 1000 * self.tick,
        )

    @initialize(n=st.integers(4, 16))
    def start(self, n: int) -> None:
        self.rows = [self._new_row(TENANTS[i % 2]) for i in range(n)]

    @rule(data=st.data())
    def move_tenant(self, data: st.DataObject) -> None:
        """A row moves to the other tenant keeping its num and id: another key, the same id at StopChurn."""
        if not self.rows:
            return
        row = data.draw(st.sampled_from(self.rows))
        other = TENANTS[1 - TENANTS.index(row["tenant"])]
        if any(r["tenant"] == other and r["num"] == row["num"] for r in self.rows):
            return
        row["tenant"] = other
        row["v"] = "moved"

    @rule(data=st.data())
    def swap_ids(self, data: st.DataObject) -> None:
        if len(self.rows) < 2:
            return
        a, b = data.draw(st.lists(st.integers(0, len(self.rows) - 1), min_size=2, max_size=2, unique=True))
        self.rows[a]["id"], self.rows[b]["id"] = self.rows[b]["id"], self.rows[a]["id"]

    @rule(data=st.data())
    def fresh_id(self, data: st.DataObject) -> None:
        if not self.rows:
            return
        self.next_id += 1
        data.draw(st.sampled_from(self.rows))["id"] = self.next_id

    @rule(data=st.data())
    def give_id_of_deleted_row(self, data: st.DataObject) -> None:
        """One row goes; another (or a new one) takes its id."""
        if len(self.rows) < 2:
            return
        gone = self.rows.pop(data.draw(st.integers(0, len(self.rows) - 1)))
        if data.draw(st.booleans()):
            data.draw(st.sampled_from(self.rows))["id"] = gone["id"]
        else:
            row = self._new_row(gone["tenant"])
            row["id"] = gone["id"]
            self.rows.append(row)

    @rule(inserts=st.integers(0, 3), deletes=st.integers(0, 2), data=st.data())
    def churn(self, inserts: int, deletes: int, data: st.DataObject) -> None:
        for _ in range(min(deletes, len(self.rows))):
            self.rows.pop(data.draw(st.integers(0, len(self.rows) - 1)))
        self.rows += [self._new_row(data.draw(st.sampled_from(TENANTS))) for _ in range(inserts)]
        for row in self.rows[: data.draw(st.integers(0, len(self.rows)))]:
            row["v"] = f"v{self.tick}"

    @rule()
    def flip_key_type(self) -> None:
        self.num_as_text = not self.num_as_text

    @rule()
    def flip_nesting(self) -> None:
        self.nest = not self.nest

    @rule(chunk_size=st.integers(1, 6), concurrency=st.integers(1, 4))
    def change_options(self, chunk_size: int, concurrency: int) -> None:
        self.opts.update(chunk_size=chunk_size, max_concurrent_requests=concurrency)

    @rule(config=faults)
    def set_faults(self, config: FaultConfig) -> None:
        self.sb.set_faults(config)

    @rule()
    def run(self) -> None:
        with contextlib.suppress(StopChurnError):  # any failure is allowed here; the final check is what matters
            self._run()

    def teardown(self) -> None:
        try:
            self.sb.set_faults(FaultConfig())
            self._run()
            assert sandbox_rows(self.sb) == expected(self.rows, self.nest, self.num_as_text)
            committed = self.store.read_committed()
            # a first run of an empty source commits nothing (there is nothing to record)
            assert committed is not None or not self.rows
            if committed is not None:
                assert not committed.frame.select(list(KEYS)).is_duplicated().any()
            assert self.store.pending_plan() is None
        finally:
            self.sb.stop()
            self.tmp.cleanup()


Identities.TestCase.settings = machine_settings(25, 12)
test_identities_state_machine = Identities.TestCase


def test_identities_state_machine_on_the_streamed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same machine with every source planned by the streamed worker path."""
    streamed(monkeypatch)
    run_state_machine_as_test(Identities, settings=Identities.TestCase.settings)
