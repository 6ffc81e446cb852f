"""A hypothesis state machine over sources, options, rejections and transient faults.

Between runs the source churns, options change (chunk size, concurrency, rejection policy, schema policy),
StopChurn starts or stops rejecting some ids, and the sandbox injects faults (500s, dropped connections,
acknowledgements lost after the update was applied, 200 HTML pages from a "proxy", 413 for large bodies). Runs
may fail. Whatever happened, once StopChurn accepts again one clean run leaves the sandbox equal to the source,
except the rows StopChurn still rejects, each of which that run reports.
(Worker deaths at every store write are the crash matrix's job: tests/test_crash_matrix.py.)
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from helpers_sync import (
    BRAND,
    T0,
    TABLE,
    Churn,
    assert_sandbox_matches,
    expected_rows,
    make_client,
    options,
    sandbox_rows,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.sandbox.pytest_plugin import SANDBOX_TEST_TOKEN
from airflow_provider_stopchurn.snapshot import SnapshotStore
from airflow_provider_stopchurn.sync import run_sync

faults = st.one_of(
    st.just(FaultConfig()),
    st.builds(FaultConfig, seed=st.integers(0, 1000), error_rate=st.sampled_from([0.2, 0.5])),
    st.builds(FaultConfig, seed=st.integers(0, 1000), drop_rate=st.just(0.3)),
    st.builds(FaultConfig, seed=st.integers(0, 1000), drop_after_apply_rate=st.sampled_from([0.3, 0.6])),
    st.builds(FaultConfig, seed=st.integers(0, 1000), html_ok_rate=st.just(0.4)),
    st.builds(FaultConfig, max_body_bytes=st.sampled_from([1200, 3000])),
)


class Recovery(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sb = SandboxServer(token=SANDBOX_TEST_TOKEN, record=False).start()
        self.tmp = tempfile.TemporaryDirectory()
        self.store = SnapshotStore(Path(self.tmp.name), BRAND, TABLE)
        self.churn = Churn(0, 30)
        self.source = self.churn.frame.copy()
        self.opts: dict[str, Any] = {"chunk_size": 7, "max_concurrent_requests": 1}
        self.rejected: set[int] = set()
        self.tick = 0

    def _run(self, **extra: Any) -> Any:
        self.tick += 1
        return run_sync(
            self.source,
            self.store,
            make_client(self.sb, max_retries=1),
            options(**{**self.opts, **extra}, allow_large_changes=True),
            run_ms=T0 + 1000 * self.tick,
        )

    @initialize(seed=st.integers(0, 10_000))
    def start(self, seed: int) -> None:
        self.churn = Churn(seed, 30)
        self.source = self.churn.frame.copy()

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

    def teardown(self) -> None:
        try:
            self.sb.set_faults(FaultConfig())
            # StopChurn still rejects some ids: every other row is right, every rejected change is reported
            summary = self._run(on_rejected_rows="quarantine", on_schema_change="update_all")
            reported = {r["id"] for r in summary.rejected}
            assert reported <= self.rejected
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


Recovery.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_recovery_state_machine = Recovery.TestCase
