"""A hypothesis state machine over sources, options, rejections, transient faults, lock loss and clock moves.

Between runs the source churns, options change (chunk size, concurrency, rejection policy, schema policy),
StopChurn starts or stops rejecting some ids, and the sandbox injects faults (500s, dropped connections,
acknowledgements lost after the update was applied, 200 HTML pages from a "proxy", 413 for large bodies, and a
500 on every try of any request holding some rows). A run may lose its lock in the middle of its delivery: the
lease is broken (as ``stopchurn unlock`` does to a lease judged dead) and another run takes the table, either
syncing it at once or only holding it while the first run goes on. The run's clock may jump back or forward.
Runs may fail. Whatever happened, once StopChurn accepts again the clean runs leave the sandbox equal to the
source, except the rows StopChurn still rejects, each of which the run reports and the quarantine names.
(Worker deaths at every store write are the crash matrix's job: tests/test_crash_matrix.py.)
Runs in about a minute; ``STOPCHURN_SOAK=long`` runs many more examples.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np
import pytest
from fault_strategies import fault_configs
from helpers_machines import LONG, ChurningSourceMachine, machine_settings, sandbox_and_store
from helpers_sync import (
    T0,
    Churn,
    assert_sandbox_matches,
    expected_rows,
    make_client,
    options,
    sandbox_rows,
)
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test
from worker_paths import streamed

from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.sandbox import FaultConfig
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.isolation import SUSPECT_AFTER
from airflow_provider_stopchurn.update.sync import run_sync

faults = fault_configs(body_limits=(1200, 3000))


pytestmark = [pytest.mark.timeout(3600)] if LONG else []


class LeaseTaken:
    """Delegates to a client; before its ``after``-th request another run takes the table's lease (once).

    The lease is broken by its token, as ``stopchurn unlock`` does; then ``then()`` runs in the sending thread:
    another whole sync, or taking the lock and keeping it until :meth:`release`.
    """

    def __init__(self, client: Any, store: SnapshotStore, after: int, then: Any) -> None:
        self.client = client
        self.store = store
        self.after = after
        self.then = then
        self.calls = 0
        self.held: Any = None
        self._lock = threading.Lock()

    def post_update_body(self, body: bytes) -> Any:
        with self._lock:
            self.calls += 1
            steal = self.calls == self.after
        if steal:
            record = self.store.read_lock()
            if record is not None and self.store.break_lock(token=record.get("token")):
                self.held = self.then()
        return self.client.post_update_body(body)

    def release(self) -> None:
        if self.held is not None:
            self.held.release()


class Recovery(ChurningSourceMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sb, self.tmp, self.store = sandbox_and_store()
        self.churn = Churn(0, 30)
        self.source = self.churn.frame.copy()
        self.opts: dict[str, Any] = {"chunk_size": 7, "max_concurrent_requests": 1}
        self.rejected: set[int] = set()
        self.tick = 0
        self.clock = 0  # ms the run's clock is off by
        self.failing: set[int] = set()

    def _run(self, sender: Any = None, **extra: Any) -> Any:
        self.tick += 1
        return run_sync(
            self.source,
            self.store,
            sender or make_client(self.sb, max_retries=1),
            options(**{**self.opts, **extra}, allow_large_changes=True),
            run_ms=T0 + 1000 * self.tick + self.clock,
        )

    @rule(deletes=st.floats(0, 0.3), updates=st.floats(0, 0.5), inserts=st.floats(0, 0.3))
    def churn_source(self, deletes: float, updates: float, inserts: float) -> None:
        self.source = self.churn.step(deletes=deletes, updates=updates, inserts=inserts)

    @rule(
        chunk_size=st.integers(1, 12),
        concurrency=st.integers(1, 4),
        policy=st.sampled_from(["fail", "quarantine"]),
    )
    def change_options(self, chunk_size: int, concurrency: int, policy: str) -> None:
        self.opts.update(chunk_size=chunk_size, max_concurrent_requests=concurrency, on_rejected_rows=policy)

    @rule(data=st.data())
    def reject_some(self, data: st.DataObject) -> None:
        ids = self.source["id"].tolist()
        picked = data.draw(st.lists(st.sampled_from(ids), max_size=3)) if ids else []
        self.rejected = {int(i) for i in picked}
        self.sb.reject_ids(self.rejected)

    @rule()
    def accept_all(self) -> None:
        self.rejected = set()
        self.sb.reject_ids(())

    @rule(config=faults)
    def set_faults(self, config: FaultConfig) -> None:
        self.sb.set_faults(config)

    @rule(data=st.data())
    def fail_some(self, data: st.DataObject) -> None:
        """StopChurn answers 500 to every try of any request holding these rows (a bug tied to the rows)."""
        ids = self.source["id"].tolist()
        picked = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=2)) if ids else []
        self.failing = {int(i) for i in picked}
        self.sb.fail_ids(self.failing)

    @rule()
    def stop_failing(self) -> None:
        self.failing = set()
        self.sb.fail_ids(())

    @rule(after=st.integers(1, 4), sync=st.booleans())
    def lose_lock(self, after: int, sync: bool) -> None:
        """Another run takes the lease in the middle of this run's delivery, and syncs or just holds the table."""

        def other_run() -> Any:
            if sync:
                with contextlib.suppress(StopChurnError):
                    self._run(holder="another run")
                return None
            lock = self.store.table_lock("another run")
            lock.acquire()
            return lock

        stealer = LeaseTaken(make_client(self.sb, max_retries=1), self.store, after, other_run)
        try:
            with contextlib.suppress(StopChurnError):
                self._run(sender=stealer)
        finally:
            stealer.release()

    @rule(jump_h=st.sampled_from([-48, -1, 1, 24 * 400]))
    def clock_moves(self, jump_h: int) -> None:
        """The run's clock jumps back or forward (createdAt/updatedAt of the changes follow it)."""
        self.clock += jump_h * 3_600_000
        with contextlib.suppress(StopChurnError):
            self._run()

    @rule()
    def run(self) -> None:
        with contextlib.suppress(StopChurnError):  # any failure is allowed here; the final check is what matters
            self._run()

    @precondition(lambda self: self.tick > 0)
    @rule()
    def schema_change(self) -> None:
        self.source = self.source.assign(extra=np.arange(len(self.source)) % 4)
        self.churn.frame = self.source.copy()
        with contextlib.suppress(StopChurnError):
            self._run(on_schema_change="update_all")

    def _others_match(self, but: set[int]) -> bool:
        want = {k: v for k, v in expected_rows(self.source).items() if k[1] not in but}
        got = {k: v for k, v in sandbox_rows(self.sb).items() if k[1] not in but}
        return got == want

    def teardown(self) -> None:
        try:
            self.sb.set_faults(FaultConfig())
            if self.failing:
                # rows StopChurn fails on every try wedge nothing: within a few tries every other row is delivered
                for _ in range(3 * (SUSPECT_AFTER + 1)):
                    with contextlib.suppress(StopChurnError):
                        self._run(on_rejected_rows="quarantine", on_schema_change="update_all")
                    if self._others_match(self.failing | self.rejected):
                        break
                assert self._others_match(self.failing | self.rejected)
            self.sb.fail_ids(())
            # StopChurn still rejects some ids: every other row is right, every rejected change is reported
            summary = self._run(on_rejected_rows="quarantine", on_schema_change="update_all")
            reported = {r["id"] for r in summary.rejected}
            assert reported <= self.rejected
            # the quarantine holds exactly the rows still rejected, and the run says where
            assert {r["id"] for r in self.store.read_quarantine()} == reported
            assert (summary.quarantine_uri is not None) == bool(reported)
            want = expected_rows(self.source)
            got = sandbox_rows(self.sb)
            for key, row in want.items():
                if key[1] not in reported:
                    assert got.get(key) == row, (key, got.get(key), row)
            assert {k for k in got if k[1] not in reported} <= set(want)
            # once StopChurn accepts them, one more run delivers them
            self.sb.reject_ids(())
            self._run(on_schema_change="update_all")
            assert_sandbox_matches(self.sb, self.source)
            assert self.store.pending_plan() is None
        finally:
            self.sb.stop()
            self.tmp.cleanup()


Recovery.TestCase.settings = machine_settings(40, 10, long_examples=300, long_steps=20)
test_recovery_state_machine = Recovery.TestCase


def test_recovery_state_machine_on_the_streamed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same machine with every source planned by the streamed worker path."""
    streamed(monkeypatch)
    run_state_machine_as_test(Recovery, settings=Recovery.TestCase.settings)
