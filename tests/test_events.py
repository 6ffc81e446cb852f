"""The event engine (``run_events``) against the sandbox on 127.0.0.1: each event key delivered once.

Expected events are written out by hand from the source rows (the oracle never calls the encoder). Every test
counts what the sandbox received per event, so a duplicate or a loss shows up as a count other than one.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers_sync import FailAfter, RecordingSender, make_client, tree_digest

from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import KEY, WATERMARK, Window, event_store
from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.events.summary import EventSummary
from airflow_provider_stopchurn.exceptions import (
    SourceDataError,
    StopChurnAuthError,
    StopChurnConfigError,
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer

BRAND = 3
STREAM = "tests.deposits"
T0 = pd.Timestamp("2025-01-01 00:00", tz="UTC")
HOUR = pd.Timedelta(hours=1)


def deposits(ids: Any, *, at: Any = None, user: Any = None, amount: Any = None) -> pd.DataFrame:
    """Deposit rows: ``deposit_id``, ``user_id``, ``amount`` and ``created_at`` (deposit i at T0 + i hours)."""
    ids = np.asarray(list(ids), dtype=np.int64)
    return pd.DataFrame(
        {
            "deposit_id": ids,
            "user_id": ids % 7 + 100 if user is None else user,
            "amount": ids * 10 if amount is None else amount,
            "created_at": [T0 + int(i) * HOUR for i in ids] if at is None else at,
        }
    )


def expected(frame: pd.DataFrame, name: str = "DEPOSIT") -> list[dict[str, Any]]:
    """The events StopChurn should receive for deposit rows (written from the rows, not by the encoder)."""
    return [
        {"brandId": BRAND, "userId": str(int(u)), "name": name, "value": int(a)}
        for u, a in zip(frame["user_id"], frame["amount"], strict=True)
    ]


def received_counts(sb: SandboxServer) -> Counter[str]:
    return Counter(json.dumps(e, sort_keys=True) for e in sb.events(BRAND))


def as_counts(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(json.dumps(e, sort_keys=True) for e in events)


@dataclass
class World:
    sb: SandboxServer
    root: Path

    @property
    def store(self) -> Any:
        return event_store(self.root, BRAND, STREAM)

    def run(self, source: Any, *, sender: Any = None, now_ms: int | None = None, **overrides: Any) -> EventSummary:
        opts: dict[str, Any] = {
            "brand_id": BRAND,
            "user_id_column": "user_id",
            "name": "DEPOSIT",
            "value_column": "amount",
            "event_key": ("deposit_id",),
            "watermark_column": "created_at",
            "lookback": dt.timedelta(hours=6),
            "chunk_size": 5,
            "max_concurrent_requests": 1,
        }
        opts.update(overrides)
        return run_events(
            source, self.store, sender or make_client(self.sb), EventOptions(**opts), stream=STREAM, now_ms=now_ms
        )

    def ledger(self) -> pd.DataFrame:
        committed = self.store.read_committed()
        assert committed is not None
        return committed.frame.to_pandas()


@pytest.fixture
def world(stopchurn_sandbox_factory: Any, tmp_path: Path) -> Iterator[World]:
    yield World(stopchurn_sandbox_factory(), tmp_path / "state")


# --- values ----------------------------------------------------------------------------------------------------
VALUES = [
    pytest.param([1, 2], [1, 2], id="ints"),
    pytest.param([1.5, 2.0], [1.5, 2], id="floats, integral ones as integers"),
    pytest.param([float("nan"), 3.0], [None, 3], id="NaN left out"),
    pytest.param([None, "x"], [None, "x"], id="null left out"),
    pytest.param([True, False], [True, False], id="bools"),
    pytest.param([decimal.Decimal("1.50"), decimal.Decimal("1E+3")], [1.5, 1000], id="decimals, exact"),
    pytest.param([{"b": 1, "a": [1, 2]}, {"x": None}], [{"a": [1, 2], "b": 1}, {"x": None}], id="objects"),
    pytest.param([[1, "a"], []], [[1, "a"], []], id="arrays"),
    pytest.param(
        [pd.Timestamp("2025-01-01", tz="Europe/Paris"), pd.Timestamp("2025-01-01")],
        [1735686000000, 1735689600000],
        id="timestamps as epoch ms, UTC",
    ),
]


@pytest.mark.parametrize(("values", "sent"), VALUES)
def test_values_are_the_updates_canonical_json(world: World, values: list[Any], sent: list[Any]) -> None:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    frame = pd.DataFrame({"id": [1, 2], "uid": ["553", "554"], "v": column})
    world.run(
        frame,
        user_id_column="uid",
        value_column="v",
        event_key=("id",),
        watermark_column=None,
        lookback=dt.timedelta(0),
    )
    want = []
    for uid, value in zip(["553", "554"], sent, strict=True):
        event: dict[str, Any] = {"brandId": BRAND, "userId": uid, "name": "DEPOSIT"}
        if value is not None:
            event["value"] = value
        want.append(event)
    assert world.sb.events(BRAND) == want


def test_user_ids_are_strings_and_names_and_objects_come_from_columns(world: World) -> None:
    frame = pd.DataFrame(
        {
            "event_id": [1, 2, 3],
            "user_id": pd.array([553, 12, 7], dtype="Int64"),
            "event": ["LOGIN", "ORDER_INITIATED", "LOGIN"],
            "total": [10.5, 20.0, 0.0],
            "meta.channel": ["web", "app", None],
        }
    )
    world.run(
        frame,
        name=None,
        name_column="event",
        value_column=None,
        value_columns=("total", "meta.channel"),
        event_key=("event_id",),
        watermark_column=None,
        lookback=dt.timedelta(0),
    )
    assert world.sb.events(BRAND) == [
        {"brandId": BRAND, "userId": "553", "name": "LOGIN", "value": {"total": 10.5, "meta": {"channel": "web"}}},
        {
            "brandId": BRAND,
            "userId": "12",
            "name": "ORDER_INITIATED",
            "value": {"total": 20, "meta": {"channel": "app"}},
        },
        {"brandId": BRAND, "userId": "7", "name": "LOGIN", "value": {"total": 0, "meta": {"channel": None}}},
    ]


def test_float_user_ids_from_a_column_with_nulls_elsewhere_are_whole_numbers(world: World) -> None:
    frame = deposits(range(3), user=[553.0, 7.0, 8.0])
    world.run(frame)
    assert [e["userId"] for e in world.sb.events(BRAND)] == ["553", "7", "8"]


# --- bad input: refused before anything is sent -------------------------------------------------------------------
BAD = [
    pytest.param(deposits(range(3), user=pd.array([1, None, 3], dtype="Int64")), {}, "no user id", id="null user id"),
    pytest.param(deposits(range(3), user=["1", "", "3"]), {}, "no user id", id="empty user id"),
    pytest.param(deposits(range(3), user=[1.5, 2.0, 3.0]), {}, "non-integral", id="fractional user id"),
    pytest.param(deposits(range(3), user=[True, False, True]), {}, "strings or integers", id="boolean user id"),
    pytest.param(
        deposits(range(2)).assign(kind=["A", None]),
        {"name": None, "name_column": "kind"},
        "no event name",
        id="null name",
    ),
    pytest.param(
        deposits(range(2)).assign(kind=[1, 2]),
        {"name": None, "name_column": "kind"},
        "must hold strings",
        id="numeric name",
    ),
    pytest.param(deposits(range(2)).drop(columns=["user_id"]), {}, "user_id_column 'user_id'", id="no user column"),
    pytest.param(deposits(range(2)), {"event_key": ("nope", "deposit_id")}, "event_key 'nope'", id="no key column"),
    pytest.param(
        deposits(range(2)).drop(columns=["created_at"]), {}, "watermark_column 'created_at'", id="no watermark column"
    ),
    pytest.param(deposits(range(2), at=[T0, pd.NaT]), {}, "no watermark", id="null watermark"),
    pytest.param(deposits(range(2), at=["a", "b"]), {}, "datetimes, dates or epoch", id="text watermark"),
    pytest.param(deposits(range(2), amount=[b"x", b"y"]), {}, "binary", id="bytes value"),
]


@pytest.mark.parametrize(("frame", "overrides", "message"), BAD)
def test_bad_input_is_refused_before_sending(world: World, frame: pd.DataFrame, overrides: Any, message: str) -> None:
    with pytest.raises(SourceDataError, match=message):
        world.run(frame, **overrides)
    assert world.sb.stats()["requests"] == 0
    assert world.store.read_committed() is None and world.store.pending_plan() is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": None}, "exactly one of name"),
        ({"name_column": "x"}, "exactly one of name"),
        ({"value_columns": ("a",)}, "at most one of value_column"),
        ({"watermark_column": None}, "lookback needs a watermark_column"),
        ({"lookback": dt.timedelta(hours=-1)}, "lookback must be"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"event_key": ()}, "event_key"),
    ],
)
def test_invalid_options(world: World, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(StopChurnConfigError, match=message):
        world.run(deposits(range(2)), **overrides)


# --- each event key once: re-runs, overlapping windows, late rows ------------------------------------------------
def test_reruns_and_overlapping_windows_deliver_each_key_once(world: World) -> None:
    first = world.run(deposits(range(0, 20)))
    assert (first.sent, first.duplicates, first.chunks) == (20, 0, 4)
    again = world.run(deposits(range(0, 20)))  # a re-run of the same DAG run: the same rows
    # deposits 0-12 are older than the window (from 13:00), 13-19 are in the ledger
    assert (again.sent, again.duplicates, again.before_window, again.requests) == (0, 7, 13, 0)
    # the next read starts 6 hours before the watermark (19h): it returns deposits 13.. again, plus new ones
    overlap = world.run(deposits(range(13, 30)))
    assert (overlap.sent, overlap.duplicates) == (10, 7)
    assert overlap.since == "2025-01-01T13:00:00.000Z" and overlap.watermark == "2025-01-02T05:00:00.000Z"
    assert received_counts(world.sb) == as_counts(expected(deposits(range(0, 30))))


def test_duplicate_keys_inside_one_source_are_sent_once(world: World) -> None:
    frame = pd.concat([deposits(range(5)), deposits([2, 3])], ignore_index=True)
    summary = world.run(frame)
    assert (summary.sent, summary.duplicates) == (5, 2)
    assert received_counts(world.sb) == as_counts(expected(deposits(range(5))))


def test_late_rows_inside_the_lookback_are_sent_once_and_older_ones_dropped(world: World) -> None:
    world.run(deposits(range(0, 13)))  # watermark 12:00, next window from 06:00
    late_inside = deposits([100], at=[T0 + 8 * HOUR])  # inserted late, created at 08:00
    late_outside = deposits([101], at=[T0 + 5 * HOUR])  # created at 05:00: before the window
    summary = world.run(pd.concat([deposits(range(6, 16)), late_inside, late_outside], ignore_index=True))
    assert (summary.sent, summary.duplicates, summary.before_window) == (4, 7, 1)
    assert summary.since == "2025-01-01T06:00:00.000Z"
    assert received_counts(world.sb) == as_counts(expected(pd.concat([deposits(range(0, 16)), late_inside])))
    # once more: the window now starts at 09:00; deposits 10-15 are in the ledger, the late row is before it
    again = world.run(pd.concat([deposits(range(10, 16)), late_inside], ignore_index=True))
    assert (again.sent, again.duplicates, again.before_window) == (0, 6, 1)


def test_events_go_in_watermark_order(world: World) -> None:
    frame = deposits([3, 1, 2, 0])
    recorder = RecordingSender(make_client(world.sb))
    world.run(frame, sender=recorder, chunk_size=100)
    assert [e["value"] for e in world.sb.events(BRAND)] == [0, 10, 20, 30]


def test_the_ledger_holds_the_window_and_moves_with_the_watermark(world: World) -> None:
    for day in range(3):
        world.run(deposits(range(24 * day, 24 * day + 24)))
        ledger = world.ledger()
        watermark = ledger[WATERMARK].max()
        assert watermark == (T0 + (24 * day + 23) * HOUR).value // 10**6
        assert ledger[WATERMARK].min() == watermark - 6 * 3_600_000  # pruned: only the lookback window stays
        assert len(ledger) == 7 and ledger[KEY].is_unique
    assert json.loads(world.ledger()[KEY].iloc[0]) == {"deposit_id": 65}
    state = world.store.read_committed().state
    mark = (T0 + 71 * HOUR).value // 10**6
    assert state == {"watermark_ms": mark, "event_key": ["deposit_id"], "covered_ms": mark - 6 * 3_600_000}


def test_without_a_watermark_every_row_is_an_event_and_the_ledger_keeps_every_key(world: World) -> None:
    plain = {"watermark_column": None, "lookback": dt.timedelta(0)}
    assert world.run(deposits(range(10)), **plain).sent == 10
    summary = world.run(deposits(range(5, 15)), **plain)
    assert (summary.sent, summary.duplicates, summary.since, summary.watermark) == (5, 5, None, None)
    assert len(world.ledger()) == 15
    assert received_counts(world.sb) == as_counts(expected(deposits(range(15))))


def test_default_key_is_every_column(world: World) -> None:
    plain = {"event_key": None, "watermark_column": None, "lookback": dt.timedelta(0)}
    frame = deposits(range(3))
    world.run(pd.concat([frame, frame.iloc[:1]], ignore_index=True), **plain)  # an identical row is one event
    changed = frame.assign(amount=[0, 10, 99])  # deposit 2 now differs in one column: another event
    summary = world.run(changed, **plain)
    assert (summary.sent, summary.duplicates) == (1, 2)
    assert json.loads(world.ledger()[KEY].iloc[0]) == {
        "amount": 0,
        "created_at": T0.value // 10**6,
        "deposit_id": 0,
        "user_id": 100,
    }


def test_json_columns_send_text_as_json_and_reformatted_text_is_the_same_event(world: World) -> None:
    plain = {"event_key": None, "watermark_column": None, "lookback": dt.timedelta(0), "json_columns": ("amount",)}
    frame = pd.DataFrame({"user_id": [1, 2], "amount": ['{"b": 1, "a": [2]}', None]})
    assert world.run(frame, **plain).sent == 2
    reformatted = frame.assign(amount=['{"a":[2],"b":1}', None])  # part of the default key: the same event
    assert (world.run(reformatted, **plain).sent, world.run(reformatted, **plain).duplicates) == (0, 2)
    assert received_counts(world.sb) == as_counts(
        [
            {"brandId": BRAND, "userId": "1", "name": "DEPOSIT", "value": {"a": [2], "b": 1}},
            {"brandId": BRAND, "userId": "2", "name": "DEPOSIT"},
        ]
    )
    with pytest.raises(SourceDataError, match=r"'amount' is in json_columns.*not valid JSON"):
        world.run(frame.assign(amount=["{", None]), **plain)
    with pytest.raises(SourceDataError, match=r"json_columns names 'other', which no event argument uses"):
        world.run(frame, **dict(plain, json_columns=("other",)))


def test_a_changed_event_key_stops_before_sending(world: World) -> None:
    world.run(deposits(range(5)))
    with pytest.raises(StopChurnConfigError, match="event key changed"):
        world.run(deposits(range(5)), event_key=("deposit_id", "user_id"))
    assert world.sb.stats()["requests"] == 1


# --- delivery: resume after a failure a retry may fix, settle after a permanent one ------------------------------
def test_transient_failure_leaves_the_plan_and_the_retry_sends_only_the_rest(world: World) -> None:
    frame = deposits(range(40))
    failing = FailAfter(make_client(world.sb), world.sb, 3)  # 500 for everything after the 3rd acknowledgement
    with pytest.raises(TransientDeliveryError):
        world.run(frame, sender=failing, run_key="run-1")
    plan = world.store.pending_plan()
    assert plan is not None and world.store.acked(plan) == {0, 1, 2}
    assert world.store.read_committed() is None
    world.sb.set_faults(FaultConfig())
    retry = world.run(frame, run_key="run-1")  # the task's next try
    # then it reads the source again: deposits 33-39 are in the ledger, the others before the window
    assert (retry.resumed_chunks, retry.chunks, retry.sent) == (5, 5, 40)
    assert (retry.duplicates, retry.before_window) == (7, 33)
    assert retry.watermark == "2025-01-02T15:00:00.000Z"
    assert received_counts(world.sb) == as_counts(expected(frame))  # each exactly once
    assert world.store.pending_plan() is None


def test_a_later_run_finishes_an_earlier_runs_plan_first(world: World) -> None:
    with pytest.raises(TransientDeliveryError):
        world.run(deposits(range(20)), sender=FailAfter(make_client(world.sb), world.sb, 1), run_key="run-1")
    world.sb.set_faults(FaultConfig())
    later = world.run(deposits(range(15, 30)), run_key="run-2")  # the next day's run, the plan still pending
    assert later.resumed_chunks == 3
    assert later.sent == 15 + 10  # this run sent the 15 left of the plan and its own 10 new deposits
    assert received_counts(world.sb) == as_counts(expected(deposits(range(30))))


def test_a_lost_acknowledgement_is_the_one_chunk_sent_twice(world: World) -> None:
    frame = deposits(range(30))

    class LoseAnswerAfter(FailAfter):
        def _count(self, result: Any) -> Any:
            with self._lock:
                self.accepted += 1
                if self.accepted == self.n:  # the next request is applied, then its connection dropped
                    self.sandbox.set_faults(FaultConfig(drop_after_apply_rate=1.0))
            return result

    with pytest.raises(TransientDeliveryError):
        world.run(frame, sender=LoseAnswerAfter(make_client(world.sb), world.sb, 2))
    assert world.sb.stats()["events"] == 15  # the third chunk reached StopChurn; its answer did not come back
    world.sb.set_faults(FaultConfig())
    world.run(frame)
    counts = received_counts(world.sb)
    twice = sorted(e for e, n in counts.items() if n == 2)
    assert twice == sorted(as_counts(expected(deposits(range(10, 15)))))  # exactly the chunk in flight
    assert set(counts) == set(as_counts(expected(frame))) and max(counts.values()) == 2


def test_http_retries_after_lost_answers_duplicate_only_those_requests(world: World) -> None:
    world.sb.set_faults(FaultConfig(seed=5, drop_after_apply_rate=0.3))
    frame = deposits(range(100))
    summary = world.run(frame, sender=make_client(world.sb, max_retries=10))
    lost = world.sb.stats()["faults"]["drop_after_apply"]
    assert lost > 0 and summary.retries == lost
    counts = received_counts(world.sb)
    assert set(counts) == set(as_counts(expected(frame)))
    assert sum(counts.values()) - len(counts) == 5 * lost  # each lost answer: one 5-event chunk applied twice


def test_a_rejection_settles_what_was_acknowledged_and_the_next_run_sends_the_rest(world: World) -> None:
    frame = deposits(range(30))
    world.run(deposits(range(0, 2)))  # watermark 01:00
    world.sb.reset()
    sender = RecordingSender(make_client(world.sb))
    # the third request of this run is refused
    ok = {"statusCode": 200, "message": "Events received"}
    world.sb.queue_response(200, ok)
    world.sb.queue_response(200, ok)
    world.sb.queue_response(400, {"statusCode": 400, "message": "Event reception failed: unknown event", "error": "x"})
    with pytest.raises(StopChurnRejectedError, match="unknown event") as caught:
        world.run(frame, sender=sender)
    assert "2 of 6 chunks were acknowledged" in str(caught.value)
    assert world.store.pending_plan() is None  # settled: nothing wedged
    ledger = world.ledger()
    assert sorted(json.loads(k)["deposit_id"] for k in ledger[KEY]) == list(range(0, 12))
    assert world.store.read_committed().state["watermark_ms"] == (T0 + HOUR).value // 10**6  # did not move
    nxt = world.run(frame)
    assert (nxt.sent, nxt.duplicates) == (18, 12)
    delivered = [e for body in sender.bodies[:2] for e in json.loads(body)["data"]] + world.sb.events(BRAND)
    assert as_counts(delivered) == as_counts(expected(deposits(range(2, 30))))


def test_a_refused_key_sends_nothing_and_records_nothing(world: World) -> None:
    with pytest.raises(StopChurnAuthError, match="refused the API key") as caught:
        world.run(deposits(range(10)), sender=make_client(world.sb, api_key="wrong-key-123"))
    assert "wrong-key-123" not in str(caught.value)
    assert world.store.pending_plan() is None and world.store.read_committed() is None
    assert world.run(deposits(range(10))).sent == 10


def test_413_splits_and_a_single_event_too_large_names_the_problem(world: World) -> None:
    world.sb.set_faults(FaultConfig(max_body_bytes=300))
    summary = world.run(deposits(range(12)), chunk_size=6)
    assert summary.sent == 12 and summary.requests > summary.chunks
    big = deposits([50], amount=["x" * 400])
    with pytest.raises(StopChurnPayloadTooLargeError, match="too large"):
        world.run(big, value_column="amount")
    assert world.store.pending_plan() is None


def test_an_event_larger_than_a_request_is_refused_before_sending(world: World) -> None:
    with pytest.raises(SourceDataError, match="too large"):
        world.run(deposits([1], amount=["x" * 500]), max_chunk_bytes=200)
    assert world.sb.stats()["requests"] == 0


# --- dry run, summary, secrets -----------------------------------------------------------------------------------
def test_dry_run_predicts_and_leaves_no_trace(world: World) -> None:
    world.run(deposits(range(10)))
    digest = tree_digest(world.root)
    requests = world.sb.stats()["requests"]
    dry = world.run(deposits(range(5, 20)), dry_run=True)
    assert (dry.dry_run, dry.sent, dry.duplicates) == (True, 10, 5)
    assert dry.samples[0] == expected(deposits([10]))[0]
    assert tree_digest(world.root) == digest and world.sb.stats()["requests"] == requests
    real = world.run(deposits(range(5, 20)))
    assert (real.sent, real.duplicates, real.chunks) == (dry.sent, dry.duplicates, dry.chunks)


def test_dry_run_counts_an_unfinished_plan_as_delivered(world: World) -> None:
    with pytest.raises(TransientDeliveryError):
        world.run(deposits(range(20)), sender=FailAfter(make_client(world.sb), world.sb, 1))
    world.sb.set_faults(FaultConfig())
    dry = world.run(deposits(range(20)), dry_run=True)
    # the plan's 3 unacknowledged chunks would be resumed; then nothing new (13 rows before the window, 7 known)
    assert (dry.resumed_chunks, dry.sent, dry.duplicates, dry.before_window) == (3, 0, 7, 13)


def test_summary_and_state_layout_hold_no_secret(world: World) -> None:
    summary = world.run(deposits(range(7)), run_key="dag.task run r1")
    data = summary.as_dict()
    assert set(data) == {
        "brand_id",
        "stream",
        "sent",
        "duplicates",
        "before_window",
        "held_future",
        "chunks",
        "bytes",
        "requests",
        "retries",
        "resumed_chunks",
        "settled_chunks",
        "since",
        "watermark",
        "watermark_ms",
        "ledger_keys",
        "dry_run",
        "state_uri",
        "duration_s",
    }
    assert data["state_uri"] == str(world.root / "events" / str(BRAND) / STREAM)
    files = sorted(str(p.relative_to(world.root)) for p in world.root.rglob("*") if p.is_file())
    assert files[0] == f"events/{BRAND}/{STREAM}/CURRENT" and len(files) == 3
    assert files[1].startswith(f"events/{BRAND}/{STREAM}/history/") and files[1].endswith(".json")  # the run's record
    assert files[2].startswith(f"events/{BRAND}/{STREAM}/snapshots/") and files[2].endswith(".parquet")
    token = world.sb.token.encode()
    assert all(token not in p.read_bytes() for p in world.root.rglob("*") if p.is_file())
    assert world.sb.token not in json.dumps(data)


def test_window_parameters() -> None:
    assert Window(None).parameters() == {"since": dt.datetime(1970, 1, 1, tzinfo=dt.UTC), "since_ms": 0}
    window = Window(1_735_689_600_000)
    assert window.parameters() == {"since": dt.datetime(2025, 1, 1, tzinfo=dt.UTC), "since_ms": 1_735_689_600_000}
