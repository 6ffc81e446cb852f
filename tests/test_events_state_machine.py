"""A hypothesis state machine for the event engine, like ``test_recovery_state_machine.py`` for updates.

Between runs the source grows: events of now, late rows inside the lookback, late rows beyond it, and rows dated in
the future (a skewed producer, a placeholder year). The run's clock moves forward; the lookback may grow. The
sandbox injects faults (500s, dropped connections, acknowledgements lost after the events were applied, 200 HTML
pages, 413 for large bodies, a 400 for one request), one chunk can fail with a 500 on every try (it is routed to a
second sandbox whose fault injection answers 500 to everything), and a run can be killed at a store write: the
store lives on an fsspec memory file system that refuses every write after the N-th, as a dead worker would; its
lock is then broken, as ``stopchurn unlock`` would after the lease expired.

After final clean runs (no faults, no poison, the same clock) every source event whose time is inside the window
(not late beyond the lookback) and not after the run's clock was delivered at least once; no event dated after the
clock was delivered; and the events delivered more than once are bounded by the requests that were never
acknowledged: those whose answer was lost after StopChurn applied them, and those in flight or unrecorded when a
run was killed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import uuid
from collections import Counter
from typing import Any, ClassVar

import fsspec
import pandas as pd
from fault_strategies import fault_configs
from helpers_events import deposit_options
from helpers_machines import machine_settings
from helpers_sync import make_client
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule
from killswitch_fs import Killed, WriteGuardedFileSystem, quiet_upath

from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import FUTURE_MARGIN, event_store
from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.sandbox.pytest_plugin import SANDBOX_TEST_TOKEN

BRAND = 21
STREAM = "machine.deposits"
T0 = int(pd.Timestamp("2025-03-01", tz="UTC").value // 10**6)
HOUR_MS = 3_600_000
LOOKBACK = dt.timedelta(hours=6)
LOOKBACK_MS = LOOKBACK // dt.timedelta(milliseconds=1)
MARGIN_MS = FUTURE_MARGIN // dt.timedelta(milliseconds=1)
YEAR_2099 = int(pd.Timestamp("2099-01-01", tz="UTC").value // 10**6)


class DyingFS(WriteGuardedFileSystem):
    """fsspec's memory file system that refuses every write after ``writes_left`` more, as a dead worker would."""

    protocol = ("evdying",)
    same_files_as_memory = True
    writes_left: ClassVar[int | None] = None

    def _before_delete(self) -> None:
        if self.writes_left is not None:
            if self.writes_left <= 0:
                raise Killed
            type(self).writes_left = self.writes_left - 1

    def _before_write(self, path: str) -> None:
        self._before_delete()


fsspec.register_implementation("evdying", DyingFS, clobber=True)


class PoisonRoute:
    """Every body to the sandbox, except one holding the event of deposit ``poison``, and the next body after
    ``reject_next()``: those go to a second sandbox whose fault injection answers 500 to every request (a chunk
    StopChurn keeps failing), where a 400 was scripted for the one to reject."""

    def __init__(self, good: Any, failing: Any, failing_sandbox: SandboxServer) -> None:
        self.good, self.failing, self.failing_sandbox = good, failing, failing_sandbox
        self.poison: int | None = None
        self.rejects = 0

    def reject_next(self) -> None:
        self.rejects += 1
        self.failing_sandbox.queue_response(
            400, {"statusCode": 400, "message": "Event reception failed", "error": "Bad Request"}
        )

    def post_event_body(self, body: bytes) -> Any:
        if self.rejects:
            self.rejects -= 1
            return self.failing.post_event_body(body)
        if self.poison is not None and any(e["value"] == self.poison for e in json.loads(body)["data"]):
            return self.failing.post_event_body(body)
        return self.good.post_event_body(body)


faults = fault_configs(body_limits=(300, 700))  # one event is ~90 bytes: 413s split


class Events(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sb = SandboxServer(token=SANDBOX_TEST_TOKEN, record=False).start()
        self.failing = SandboxServer(token=SANDBOX_TEST_TOKEN, record=False, faults=FaultConfig(error_rate=1.0)).start()
        self.route = PoisonRoute(
            make_client(self.sb, max_retries=1), make_client(self.failing, max_retries=0), self.failing
        )
        root = quiet_upath(f"evdying://events-machine/{uuid.uuid4().hex}")
        self.store = event_store(root, BRAND, STREAM)
        self.now = T0
        self.ids = itertools.count(1)
        #: deposit id -> (created_at ms, whether it is owed: inside the window when it was added)
        self.rows: dict[int, tuple[int, bool]] = {}
        self.opts: dict[str, Any] = {"chunk_size": 4, "max_concurrent_requests": 1, "lookback": LOOKBACK}
        self.max_chunk = 4
        self.max_workers = 1
        self.kills = 0

    # --- the source -----------------------------------------------------------------------------------------
    def _add(self, at: int, owed: bool) -> None:
        self.rows[next(self.ids)] = (at, owed)

    @initialize(n=st.integers(1, 12))
    def first_rows(self, n: int) -> None:
        for i in range(n):
            self._add(self.now - i * 60_000, True)

    @rule(n=st.integers(1, 8), spread_min=st.integers(0, 30))
    def new_events(self, n: int, spread_min: int) -> None:
        for i in range(n):
            self._add(self.now - (i * spread_min * 60_000) // max(n, 1), True)

    @rule(ago_min=st.integers(1, (LOOKBACK_MS - MARGIN_MS) // 60_000 - 1))
    def late_event_inside_the_lookback(self, ago_min: int) -> None:
        self._add(self.now - ago_min * 60_000, True)

    @rule(ago_h=st.integers(7, 48))
    def late_event_beyond_the_lookback(self, ago_h: int) -> None:
        self._add(self.now - ago_h * HOUR_MS, False)  # may be dropped as before the window: not owed

    @rule(ahead=st.sampled_from([90_000, 2 * HOUR_MS, 30 * 24 * HOUR_MS, None]))
    def future_event(self, ahead: int | None) -> None:
        self._add(YEAR_2099 if ahead is None else self.now + ahead, True)

    @rule(hours=st.sampled_from([0, 1, 3, 24]))
    def clock_moves(self, hours: int) -> None:
        self.now += hours * HOUR_MS + 7_000

    def _frame(self) -> pd.DataFrame:
        ids = sorted(self.rows)
        return pd.DataFrame(
            {
                "deposit_id": ids,
                "user_id": [i % 5 for i in ids],
                "amount": ids,  # the event's value names its deposit
                "created_ms": [self.rows[i][0] for i in ids],
            }
        )

    # --- StopChurn and the worker ---------------------------------------------------------------------------
    @rule(config=faults)
    def set_faults(self, config: FaultConfig) -> None:
        self.sb.set_faults(config)

    @rule(data=st.data())
    def poison_one_event(self, data: st.DataObject) -> None:
        self.route.poison = data.draw(st.sampled_from(sorted(self.rows)))

    @rule()
    def heal_the_poison(self) -> None:
        self.route.poison = None

    @rule()
    def reject_the_next_request(self) -> None:
        self.route.reject_next()

    @rule(chunk_size=st.integers(1, 8), workers=st.integers(1, 3))
    def change_options(self, chunk_size: int, workers: int) -> None:
        self.opts.update(chunk_size=chunk_size, max_concurrent_requests=workers)
        self.max_chunk = max(self.max_chunk, chunk_size)
        self.max_workers = max(self.max_workers, workers)

    @rule(hours=st.sampled_from([6, 24, 72]))
    def change_lookback(self, hours: int) -> None:
        # never below LOOKBACK, so a late row inside LOOKBACK stays owed; a longer one must not resend what the
        # ledger pruned (the bound on events sent twice below would catch it)
        self.opts["lookback"] = dt.timedelta(hours=hours)

    def _run(self) -> Any:
        options = deposit_options(BRAND, watermark_column="created_ms", **self.opts)
        return run_events(self._frame(), self.store, self.route, options, stream=STREAM, now_ms=self.now)

    @rule()
    def run(self) -> None:
        with contextlib.suppress(StopChurnError):  # any failure is allowed here; the final check is what matters
            self._run()

    @rule(writes=st.integers(0, 12))
    def run_killed_at_a_store_write(self, writes: int) -> None:
        DyingFS.writes_left = writes
        try:
            self._run()
        except Killed:
            self.kills += 1
        except StopChurnError:
            pass
        finally:
            DyingFS.writes_left = None
        # the dead worker's lease runs out (or on call breaks it): the next run takes the stream
        self.store.break_lock()

    # --- the promise ----------------------------------------------------------------------------------------
    def teardown(self) -> None:
        try:
            self.sb.set_faults(FaultConfig())
            self.route.poison = None
            self.route.rejects = 0
            self._run()
            summary = self._run()
            assert summary.sent == 0 and self.store.pending_plan() is None
            got = Counter(e["value"] for e in self.sb.events(BRAND))
            for deposit, (at, owed) in self.rows.items():
                if at > self.now:
                    assert got[deposit] == 0, f"deposit {deposit} dated after the clock was sent"
                elif owed:
                    assert got[deposit] >= 1, f"deposit {deposit} at {at} (clock {self.now}) was never delivered"
            assert set(got) <= set(self.rows)
            # events sent more than once: only those of requests that were never acknowledged
            extra = sum(n - 1 for n in got.values())
            lost_answers = self.sb.stats()["faults"]["drop_after_apply"]
            assert extra <= self.max_chunk * (lost_answers + self.kills * self.max_workers), (
                extra,
                lost_answers,
                self.kills,
            )
        finally:
            self.sb.stop()
            self.failing.stop()


Events.TestCase.settings = machine_settings(int(os.environ.get("STOPCHURN_EVENTS_MACHINE_EXAMPLES", "20")), 14)
test_events_state_machine = Events.TestCase
