"""The event engine at its edges: future-dated rows, the run's clock, a chunk StopChurn keeps failing, and values
at the limits of the types (against the sandbox on 127.0.0.1).

The run's clock is the ``now_ms`` argument of ``run_events``, so each test says what time the run believes it is.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers_sync import make_client
from test_events import BRAND, HOUR, STREAM, T0, World, as_counts, deposits, expected, received_counts

from airflow_provider_stopchurn import cli
from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.events.engine import SETTLE_AFTER_FAILED_TRIES
from airflow_provider_stopchurn.events.ledger import FUTURE_MARGIN, KEY
from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.exceptions import (
    SnapshotLockedError,
    SourceDataError,
    StopChurnConfigError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.sandbox import FaultConfig

#: The run clock of these tests: two days after T0 (deposit i is at T0 + i hours).
NOW = T0 + 48 * HOUR


@pytest.fixture
def world(stopchurn_sandbox_factory: Any, tmp_path: Path) -> Iterator[World]:
    yield World(stopchurn_sandbox_factory(), tmp_path / "state")


def ms(ts: pd.Timestamp) -> int:
    return int(ts.value // 10**6)


# --- 1. a row dated in the future never stops later events ------------------------------------------------------
def test_a_future_row_is_held_and_never_hides_later_events(world: World) -> None:
    typo = deposits([900], at=[pd.Timestamp("2099-01-01", tz="UTC")])  # a placeholder year
    first = world.run(pd.concat([deposits(range(0, 10)), typo], ignore_index=True), now_ms=ms(NOW))
    # the future row is held, not sent; the watermark stays at the newest event sent (09:00), far below the clock
    assert (first.sent, first.held_future) == (10, 1)
    assert first.watermark == "2025-01-01T09:00:00.000Z"
    later = deposits(range(10, 20))  # the next day's deposits, all after the watermark but before 2099
    second = world.run(pd.concat([deposits(range(5, 20)), typo], ignore_index=True), now_ms=ms(NOW))
    assert (second.sent, second.held_future, second.before_window) == (10, 1, 0)
    assert received_counts(world.sb) == as_counts(expected(deposits(range(0, 20))))
    assert world.store.read_committed().state["watermark_ms"] <= ms(NOW) - FUTURE_MARGIN // dt.timedelta(milliseconds=1)
    # once its time has come (the run's clock passed it), the held row is sent, once
    third = world.run(pd.concat([later, typo], ignore_index=True), now_ms=ms(pd.Timestamp("2099-01-02", tz="UTC")))
    assert (third.sent, third.held_future) == (1, 0)
    assert received_counts(world.sb) == as_counts(expected(pd.concat([deposits(range(0, 20)), typo])))


def test_the_watermark_never_passes_the_run_clock_minus_the_margin(world: World) -> None:
    # rows up to the clock itself are sent, but the watermark stops at clock - margin, so a row stamped a moment
    # before the clock by a producer whose clock lags ours still comes back through the next window
    now = T0 + 10 * HOUR
    at = [T0, now - pd.Timedelta(seconds=10), now]
    summary = world.run(deposits([1, 2, 3], at=at), now_ms=ms(now), lookback=dt.timedelta(0))
    assert summary.sent == 3
    assert summary.watermark_ms == ms(now) - FUTURE_MARGIN // dt.timedelta(milliseconds=1)
    straggler = deposits([4], at=[now - pd.Timedelta(seconds=20)])  # committed late by its producer
    again = world.run(pd.concat([deposits([1, 2, 3], at=at), straggler], ignore_index=True), now_ms=ms(now))
    assert (again.sent, again.duplicates) == (1, 2)
    assert received_counts(world.sb) == as_counts(
        expected(pd.concat([deposits([1, 2, 3], at=at), straggler], ignore_index=True))
    )


def test_a_watermark_left_in_the_future_by_an_earlier_version_is_pulled_back(world: World) -> None:
    # the ledger an earlier version committed after sending a 2099 row: its window started in 2099
    typo = deposits([900], at=[pd.Timestamp("2099-01-01", tz="UTC")])
    world.run(pd.concat([deposits(range(0, 5)), typo], ignore_index=True), now_ms=ms(pd.Timestamp("2099-06-01")))
    assert world.store.read_committed().state["watermark_ms"] == ms(pd.Timestamp("2099-01-01", tz="UTC"))
    summary = world.run(pd.concat([deposits(range(0, 48)), typo], ignore_index=True), now_ms=ms(NOW))
    # the window starts again at the run's clock minus the margin and the lookback: the deposits inside it, never
    # sent while the window started in 2099, go out now; the 2099 row is in the future again for this clock
    assert (summary.sent, summary.duplicates, summary.held_future) == (6, 0, 1)
    assert summary.watermark_ms is not None and summary.watermark_ms <= ms(NOW)
    delivered = pd.concat([deposits(range(0, 5)), typo, deposits(range(42, 48))])
    assert received_counts(world.sb) == as_counts(expected(delivered))


def test_dates_and_epoch_milliseconds_are_held_the_same_way(world: World) -> None:
    frame = pd.DataFrame(
        {
            "deposit_id": [1, 2],
            "user_id": [5, 6],
            "amount": [10, 20],
            "created_ms": [ms(T0), ms(pd.Timestamp("2099-01-01", tz="UTC"))],
        }
    )
    summary = world.run(frame, watermark_column="created_ms", now_ms=ms(NOW))
    assert (summary.sent, summary.held_future, summary.watermark_ms) == (1, 1, ms(T0))
    days = frame.assign(day=[dt.date(2025, 1, 1), dt.date(2099, 1, 1)]).drop(columns=["created_ms"])
    other = World(world.sb, world.root / "dates")
    assert other.run(days, watermark_column="day", now_ms=ms(NOW)).held_future == 1


def test_dry_run_counts_held_future_rows(world: World) -> None:
    typo = deposits([900], at=[pd.Timestamp("2099-01-01", tz="UTC")])
    dry = world.run(pd.concat([deposits(range(3)), typo], ignore_index=True), now_ms=ms(NOW), dry_run=True)
    assert (dry.sent, dry.held_future) == (3, 1)


# --- 15. values at the limits: a clear error before anything is sent -------------------------------------------
def test_a_user_id_beyond_exact_integers_is_refused_naming_it(world: World) -> None:
    with pytest.raises(SourceDataError, match=r"user_id.*1e\+20"):
        world.run(deposits(range(3), user=[1.0, 1e20, 3.0]), now_ms=ms(NOW))
    assert world.sb.stats()["requests"] == 0
    assert world.store.pending_plan() is None and world.store.read_committed() is None


def test_a_lookback_beyond_the_datetime_range_is_refused_at_validation() -> None:
    with pytest.raises(StopChurnConfigError, match="lookback"):
        EventOptions(
            brand_id=BRAND,
            user_id_column="user_id",
            name="DEPOSIT",
            watermark_column="created_at",
            lookback=dt.timedelta(days=999_999_999),
        )


def test_the_operator_refuses_such_a_lookback_at_dag_parse_time() -> None:
    from airflow_provider_stopchurn.operators.stopchurn import StopChurnEventOperator

    with pytest.raises(ValueError, match="lookback"):
        StopChurnEventOperator(
            task_id="send",
            dataframe=deposits(range(2)),
            user_id_column="user_id",
            name="DEPOSIT",
            watermark_column="created_at",
            lookback=dt.timedelta(days=999_999_999),
        )


def test_a_long_lookback_before_1970_reads_everything_on_every_run(world: World) -> None:
    old = deposits([1, 2], at=[pd.Timestamp("1900-01-01", tz="UTC"), pd.Timestamp("1901-01-01", tz="UTC")])
    world.run(old, lookback=dt.timedelta(days=700_000), now_ms=ms(NOW))
    again = world.run(old, lookback=dt.timedelta(days=700_000), now_ms=ms(NOW))  # OverflowError before
    assert (again.sent, again.duplicates) == (0, 2)


# --- 3. a chunk StopChurn keeps failing with a retryable error does not wedge the stream ------------------------
class PoisonRoute:
    """Sends every body to the sandbox, except a body holding an event whose value is ``poison``: that one goes to
    a second sandbox whose fault injection answers 500 to every request (StopChurn failing on that chunk)."""

    def __init__(self, good: StopChurnClient, failing: StopChurnClient, poison: int) -> None:
        self.good, self.failing, self.poison = good, failing, poison
        self.bodies: list[bytes] = []

    def post_event_body(self, body: bytes) -> Any:
        self.bodies.append(body)
        values = [e.get("value") for e in json.loads(body)["data"]]
        return (self.failing if self.poison in values else self.good).post_event_body(body)


@pytest.fixture
def poison(world: World, stopchurn_sandbox_factory: Any) -> PoisonRoute:
    failing = stopchurn_sandbox_factory(faults=FaultConfig(error_rate=1.0))
    return PoisonRoute(make_client(world.sb), make_client(failing, max_retries=1), poison=70)


def test_a_chunk_failing_on_every_try_settles_the_plan_and_a_fixed_source_converges(
    world: World, poison: PoisonRoute
) -> None:
    frame = deposits(range(20))  # deposit 7 (value 70) is in the second chunk of 5
    for attempt in range(1, SETTLE_AFTER_FAILED_TRIES + 1):
        with pytest.raises(TransientDeliveryError) as caught:
            world.run(frame, sender=poison, now_ms=ms(NOW))
        if attempt < SETTLE_AFTER_FAILED_TRIES:  # a retry may still get through: the plan stays, to be resumed
            assert world.store.pending_plan() is not None
    # the last try settled the plan: the acknowledged chunk is in the ledger, the rest will be read again
    assert "settled" in str(caught.value) and "1 of 4 chunks" in str(caught.value)
    assert world.store.pending_plan() is None
    assert sorted(json.loads(k)["deposit_id"] for k in world.ledger()[KEY]) == [0, 1, 2, 3, 4]
    assert world.store.read_committed().state["watermark_ms"] is None  # first run: the window did not move
    # the owner fixes the row StopChurn choked on; the next run reads it from the source and sends the rest once
    fixed = frame.assign(amount=frame["amount"].where(frame["deposit_id"] != 7, 71))
    summary = world.run(fixed, sender=poison, now_ms=ms(NOW))
    assert (summary.sent, summary.duplicates) == (15, 5)
    assert received_counts(world.sb) == as_counts(expected(fixed))  # each event once: nothing lost, none twice


def test_after_the_settle_only_unacknowledged_events_are_sent_again(world: World, poison: PoisonRoute) -> None:
    frame = deposits(range(20))
    for _ in range(SETTLE_AFTER_FAILED_TRIES):
        with pytest.raises(TransientDeliveryError):
            world.run(frame, sender=poison, now_ms=ms(NOW))
    assert len(poison.bodies) == 1 + SETTLE_AFTER_FAILED_TRIES  # chunk 0 once; the failing chunk once per try
    summary = world.run(frame, now_ms=ms(NOW))  # the network (or StopChurn) is fixed: the same source goes through
    assert (summary.sent, summary.duplicates) == (15, 5)  # the acknowledged chunk is not sent again
    assert received_counts(world.sb) == as_counts(expected(frame))


def test_a_try_that_fails_for_another_reason_than_stopchurn_does_not_count(world: World, poison: PoisonRoute) -> None:
    frame = deposits(range(20))
    with pytest.raises(TransientDeliveryError):
        world.run(frame, sender=poison, now_ms=ms(NOW))
    world.run(frame, now_ms=ms(NOW))  # StopChurn recovered: the plan is finished, not settled
    assert world.store.pending_plan() is None
    assert received_counts(world.sb) == as_counts(expected(frame))


# --- stopchurn settle on an event plan ----------------------------------------------------------------------------
def test_stopchurn_settle_settles_an_event_plan(
    world: World, poison: PoisonRoute, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = deposits(range(20))
    with pytest.raises(TransientDeliveryError):
        world.run(frame, sender=poison, now_ms=ms(NOW))
    assert world.store.pending_plan() is not None
    capsys.readouterr()
    by_table = [str(world.root / "events"), "--brand", str(BRAND), "--table", STREAM]
    by_stream = [str(world.root), "--brand", str(BRAND), "--stream", STREAM]
    assert cli.main(["settle", *by_stream, "--yes", "--json"]) == cli.OK
    settled = json.loads(capsys.readouterr().out)
    assert (settled["settled"], settled["acknowledged_chunks"], settled["total_chunks"]) == (True, 1, 4)
    assert (settled["recorded_events"], settled["unacknowledged_events"], settled["committed"]) == (5, 15, True)
    assert world.store.pending_plan() is None
    assert cli.main(["settle", *by_table, "--yes"]) == cli.OK
    assert "No pending plan" in capsys.readouterr().out
    assert cli.main(["settle", str(world.root), "--brand", str(BRAND), "--yes"]) == cli.USAGE
    world.run(frame, now_ms=ms(NOW))
    assert received_counts(world.sb) == as_counts(expected(frame))


def test_stopchurn_settle_by_table_path_recognises_an_event_plan(
    world: World, poison: PoisonRoute, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TransientDeliveryError):
        world.run(deposits(range(20)), sender=poison, now_ms=ms(NOW))
    capsys.readouterr()
    table = [str(world.root / "events"), "--brand", str(BRAND), "--table", STREAM, "--yes"]
    assert cli.main(["settle", *table]) == cli.OK, capsys.readouterr().err
    assert "Settled event plan" in capsys.readouterr().out


# --- one writer -----------------------------------------------------------------------------------------------------
def test_a_second_run_of_the_stream_sends_nothing_while_another_holds_it(world: World) -> None:
    with world.store.lock("another run of the stream"), pytest.raises(SnapshotLockedError, match="another run"):
        world.run(deposits(range(5)), now_ms=ms(NOW), lock_wait_s=0)
    assert world.sb.stats()["requests"] == 0
    assert world.run(deposits(range(5)), now_ms=ms(NOW)).sent == 5  # once it is released
