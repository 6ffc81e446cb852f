"""A hypothesis state machine over update runs and historical exports of one table.

Between steps the source churns; update runs meet sandbox faults (500s, dropped connections, acknowledgements lost
after the update was applied, 200 HTML pages) or die at a write of the store; exports (with or without
``replace_snapshot``) die at a write of the store or of their output folder. A killed run's lock is broken, as it
would be at once for a process that is gone; a killed export is retried by its task (same run), and a finished
export is uploaded through the sandbox's Back Office route, as the onboarding asks.

After every finished export its files hold exactly the source it read. At the end, one clean update run leaves
the sandbox equal to the source and nothing pending. ``STOPCHURN_SOAK=long`` runs more and longer examples.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request

import pandas as pd
from fault_strategies import fault_configs
from helpers_machines import ChurningSourceMachine, machine_settings
from helpers_sync import BRAND, T0, TABLE, Churn, assert_sandbox_matches, expected_rows, make_client, options
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import rule
from killswitch_fs import Killed, KillSwitchFileSystem, fresh_root

from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.export.engine import run_export
from airflow_provider_stopchurn.export.files import MANIFEST
from airflow_provider_stopchurn.export.folder import output_folder
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.export.summary import ExportSummary
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.sandbox.pytest_plugin import SANDBOX_TEST_TOKEN
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

faults = fault_configs()
#: 0: no kill; n: the process dies just before its n-th write (an export writes about 8 times, an update run more)
kills = st.one_of(st.just(0), st.integers(1, 14))


class ExportsAndUpdates(ChurningSourceMachine):
    source_rows = 20

    def __init__(self) -> None:
        super().__init__()
        self.sb = SandboxServer(token=SANDBOX_TEST_TOKEN, record=False).start()
        self.store = SnapshotStore(fresh_root("snapshots"), BRAND, TABLE)
        self.output = fresh_root("exports")
        self.churn = Churn(0, 20)
        self.source = self.churn.frame.copy()
        self.tick = 0

    def _killed(self) -> None:
        """The dead process's store as it left it; its lock broken, as for a process that is gone."""
        KillSwitchFileSystem.arm(None)
        self.store.break_lock()

    @rule(deletes=st.floats(0, 0.4), updates=st.floats(0, 0.5), inserts=st.floats(0, 0.3))
    def churn_source(self, deletes: float, updates: float, inserts: float) -> None:
        self.source = self.churn.step(deletes=deletes, updates=updates, inserts=inserts)

    @rule(config=faults)
    def set_faults(self, config: FaultConfig) -> None:
        self.sb.set_faults(config)

    @rule(kill_at=kills, chunk_size=st.integers(2, 9))
    def update_run(self, kill_at: int, chunk_size: int) -> None:
        self.tick += 1
        opts = options(
            chunk_size=chunk_size,
            max_concurrent_requests=2,
            allow_large_changes=True,
            allow_empty_source=True,
            lock_wait_s=0,
        )
        KillSwitchFileSystem.die_at(kill_at)
        try:
            run_sync(self.source, self.store, make_client(self.sb, max_retries=1), opts, run_ms=T0 + 1000 * self.tick)
        except Killed:
            event("update run killed")
            self._killed()
        except StopChurnError as err:  # any failure is allowed here; the final check is what matters
            event(f"update run failed: {type(err).__name__}")
        KillSwitchFileSystem.arm(None)

    @rule(replace=st.booleans(), kill_at=kills)
    def export(self, replace: bool, kill_at: int) -> None:
        self.tick += 1
        read = self.source.copy()
        export_options = ExportOptions(
            brand_id=BRAND,
            table_name=TABLE,
            replace_snapshot=replace,
            max_file_bytes=1500,
            run_id=f"run-{self.tick}",
            run_key=f"export run-{self.tick}",
            lock_wait_s=0,
        )

        def attempt() -> ExportSummary | None:
            try:
                return run_export(read, self.store, self.output, export_options, run_ms=T0 + 1000 * self.tick)
            except StopChurnError as err:
                event(f"export refused: {type(err).__name__}")
                return None  # refused (a snapshot it may not replace): nothing to upload

        KillSwitchFileSystem.die_at(kill_at)
        try:
            summary = attempt()
        except Killed:
            event("export killed")
            self._killed()
            summary = attempt()  # the task's retry: the same run, the same source
        KillSwitchFileSystem.arm(None)
        if summary is not None:
            event(f"export uploaded (replaced: {summary.replaced_snapshot}, kept rows: {bool(summary.kept_rows)})")
            self._check_and_upload(summary, read, export_options)

    def _check_and_upload(self, summary: ExportSummary, read: pd.DataFrame, export_options: ExportOptions) -> None:
        folder = output_folder(self.output, export_options)
        manifest = json.loads((folder / MANIFEST).read_bytes())
        rows = []
        for item in manifest["files"]:
            body = (folder / item["name"]).read_bytes()
            rows += [record["data"] for record in json.loads(body)]
            request = urllib.request.Request(
                f"{self.sb.url}/_sandbox/historical/{BRAND}/{TABLE}", data=body, method="POST"
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200
        assert manifest["rows"] == summary.rows == len(read)
        want = expected_rows(read)
        assert len(rows) == len(want) and {(type(r["id"]).__name__, r["id"]): r for r in rows} == want

    def teardown(self) -> None:
        try:
            KillSwitchFileSystem.arm(None)
            self.sb.set_faults(FaultConfig())
            self.tick += 1
            opts = options(allow_large_changes=True, allow_empty_source=True)
            run_sync(self.source, self.store, make_client(self.sb), opts, run_ms=T0 + 1000 * self.tick)
            assert_sandbox_matches(self.sb, self.source)
            assert self.store.pending_plan() is None
            again = run_sync(self.source, self.store, make_client(self.sb), opts, run_ms=T0 + 1000 * self.tick + 1)
            assert again.inserted + again.updated + again.deleted == 0
        finally:
            with contextlib.suppress(Exception):
                self.sb.stop()


ExportsAndUpdates.TestCase.settings = machine_settings(120, 12, long_examples=400, long_steps=16)
test_export_state_machine = ExportsAndUpdates.TestCase
