"""Tests of the StopChurn sandbox: real HTTP on 127.0.0.1, every loop bounded."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
import requests

from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.sandbox.__main__ import _is_loopback

TOKEN = "sandbox-test-key"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MS = 1694357675000


def update(row_id: Any, kind: str = "insert", table: str = "user", brand: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "data": {
            "brandId": brand,
            "tableName": table,
            "data": {"id": row_id, **fields},
            "createdAt": MS,
            "updatedAt": MS,
        },
    }


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers.update(AUTH)
        yield s


@pytest.fixture
def sandbox(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> SandboxServer:
    return stopchurn_sandbox_factory(record=True)


def post_updates(session: requests.Session, sb: SandboxServer, updates: list[Any], **kw: Any) -> requests.Response:
    return session.post(f"{sb.url}/client-data/update", json={"data": updates}, timeout=10, **kw)


# ------------------------------------------------------------------------------------------------ accepting


def test_insert_update_delete_apply_in_order(sandbox: SandboxServer, session: requests.Session) -> None:
    r = post_updates(
        session,
        sandbox,
        [update("a", email="a@x"), update("b", email="b@x"), update("c", kind="update", email="c@x")],
    )
    assert r.status_code == 200
    assert r.json() == {"statusCode": 200, "message": "Updates received"}
    assert r.headers["Content-Type"] == "application/json"

    r = post_updates(session, sandbox, [update("a", kind="update", status="active"), update("b", kind="delete")])
    assert r.status_code == 200
    assert sandbox.rows(1, "user") == [{"id": "a", "status": "active"}, {"id": "c", "email": "c@x"}]
    assert sandbox.table(1, "user") == {
        "a": {"id": "a", "status": "active"},
        "c": {"id": "c", "email": "c@x"},
    }
    assert sandbox.received() == [
        ("insert", 1, "user", "a"),
        ("insert", 1, "user", "b"),
        ("update", 1, "user", "c"),
        ("update", 1, "user", "a"),
        ("delete", 1, "user", "b"),
    ]
    stats = sandbox.stats()
    assert stats["requests"] == 2
    assert stats["accepted_requests"] == 2
    assert stats["updates"] == {"insert": 2, "update": 2, "delete": 1}


def test_insert_of_known_id_upserts_and_delete_of_absent_id_is_fine(
    sandbox: SandboxServer, session: requests.Session
) -> None:
    assert post_updates(session, sandbox, [update(7, name="x"), update(7, name="y")]).status_code == 200
    assert sandbox.rows(1, "user") == [{"id": 7, "name": "y"}]
    assert post_updates(session, sandbox, [update(8, kind="delete")]).status_code == 200
    assert sandbox.rows(1, "user") == [{"id": 7, "name": "y"}]


def test_int_and_str_ids_are_distinct(sandbox: SandboxServer, session: requests.Session) -> None:
    r = post_updates(session, sandbox, [update("1", v="str"), update(1, v="int"), update("2", v="s2")])
    assert r.status_code == 200
    assert sandbox.rows(1, "user") == [{"id": 1, "v": "int"}, {"id": "1", "v": "str"}, {"id": "2", "v": "s2"}]
    post_updates(session, sandbox, [update(1, kind="delete")])
    assert sandbox.rows(1, "user") == [{"id": "1", "v": "str"}, {"id": "2", "v": "s2"}]


def test_tables_are_separate_per_brand_and_name(sandbox: SandboxServer, session: requests.Session) -> None:
    post_updates(session, sandbox, [update(1, brand=1), update(2, brand=2), update(3, table="orders")])
    assert [r["id"] for r in sandbox.rows(1, "user")] == [1]
    assert [r["id"] for r in sandbox.rows(2, "user")] == [2]
    assert [r["id"] for r in sandbox.rows(1, "orders")] == [3]
    assert sandbox.rows(9, "nothing") == []


def test_rows_are_copies(sandbox: SandboxServer, session: requests.Session) -> None:
    post_updates(session, sandbox, [update(1, v=1)])
    sandbox.rows(1, "user")[0]["v"] = 2
    assert sandbox.rows(1, "user") == [{"id": 1, "v": 1}]


def test_empty_data_array_is_accepted(sandbox: SandboxServer, session: requests.Session) -> None:
    r = post_updates(session, sandbox, [])
    assert r.status_code == 200
    assert r.json()["message"] == "Updates received"
    assert sandbox.stats()["updates"] == {"insert": 0, "update": 0, "delete": 0}


def test_nested_rows_and_large_body(sandbox: SandboxServer, session: requests.Session) -> None:
    prefs = {"email": True, "phone": False}
    big = [update(str(i), marketingPreferences=prefs, tags=["a", "b"], blob="x" * 500) for i in range(8000)]
    body = orjson.dumps({"data": big})
    assert len(body) > 4_000_000
    r = session.post(f"{sandbox.url}/client-data/update", data=body, timeout=30)
    assert r.status_code == 200
    assert len(sandbox.rows(1, "user")) == 8000
    assert sandbox.table(1, "user")["42"]["marketingPreferences"] == prefs


def test_chunked_request_body(sandbox: SandboxServer, session: requests.Session) -> None:
    body = orjson.dumps({"data": [update(i) for i in range(50)]})
    pieces = iter([body[:100], body[100:5000], body[5000:]])
    r = session.post(f"{sandbox.url}/client-data/update", data=pieces, timeout=10)
    assert r.status_code == 200
    assert len(sandbox.rows(1, "user")) == 50


def test_events_are_accepted(sandbox: SandboxServer, session: requests.Session) -> None:
    events = [
        {"brandId": 1, "userId": "553", "name": "ORDER_INITIATED", "value": 4000},
        {"brandId": 1, "userId": "7", "name": "LOGIN"},
        {"brandId": 2, "userId": "9", "name": "PLAN", "value": {"tier": "gold"}},
        {"brandId": 2, "userId": "9", "name": "TAGS", "value": ["a", 1, None]},
        {"brandId": 2, "userId": "9", "name": "NOTHING", "value": None},
    ]
    r = session.post(f"{sandbox.url}/client-data/event", json={"data": events}, timeout=10)
    assert r.status_code == 200
    assert r.json() == {"statusCode": 200, "message": "Events received"}
    assert sandbox.events(1) == events[:2]
    assert sandbox.events(2) == events[2:]
    assert sandbox.stats()["events"] == 5


# ----------------------------------------------------------------------------------------------- refusing


def test_unauthorized(sandbox: SandboxServer) -> None:
    url = f"{sandbox.url}/client-data/update"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        r = requests.post(url, json={"data": [update(1)]}, headers=headers, timeout=10)
        assert r.status_code == 401
        assert r.json() == {"statusCode": 401, "message": "Invalid client api token", "error": "Unauthorized"}
    r = requests.post(f"{sandbox.url}/client-data/event", json={"data": []}, timeout=10)
    assert r.status_code == 401
    assert sandbox.rows(1, "user") == []
    assert sandbox.stats()["unauthorized"] == 5


def _with(path: str, value: Any) -> dict[str, Any]:
    """A valid update with the field at ``path`` (dotted) set to ``value``, or removed when ``value`` is DEL."""
    upd = update("x")
    keys = path.split(".")
    target = upd
    for key in keys[:-1]:
        target = target[key]
    if value is DEL:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return upd


DEL = object()

BAD_UPDATES = [
    ("not an object", [1, 2], "data[1] must be an object"),
    ("type missing", _with("type", DEL), "data[1].type"),
    ("type unknown", _with("type", "upsert"), "data[1].type"),
    ("type not a string", _with("type", ["insert"]), "data[1].type"),
    ("record missing", _with("data", DEL), "data[1].data must be an object"),
    ("record is a list", _with("data", []), "data[1].data must be an object"),
    ("extra envelope key", {**update("x"), "op": 1}, "data[1] has unknown field(s): op"),
    ("brandId missing", _with("data.brandId", DEL), "data[1].data.brandId"),
    ("brandId string", _with("data.brandId", "1"), "data[1].data.brandId"),
    ("brandId bool", _with("data.brandId", True), "data[1].data.brandId"),
    ("brandId float", _with("data.brandId", 1.0), "data[1].data.brandId"),
    ("tableName missing", _with("data.tableName", DEL), "data[1].data.tableName"),
    ("tableName empty", _with("data.tableName", ""), "data[1].data.tableName"),
    ("tableName number", _with("data.tableName", 3), "data[1].data.tableName"),
    ("row missing", _with("data.data", DEL), "data[1].data.data"),
    ("row a string", _with("data.data", "{}"), "data[1].data.data"),
    ("id missing", _with("data.data.id", DEL), "data[1].data.data.id"),
    ("id null", _with("data.data.id", None), "data[1].data.data.id"),
    ("id bool", _with("data.data.id", False), "data[1].data.data.id"),
    ("id object", _with("data.data.id", {"a": 1}), "data[1].data.data.id"),
    ("id array", _with("data.data.id", [1]), "data[1].data.data.id"),
    ("createdAt missing", _with("data.createdAt", DEL), "data[1].data.createdAt"),
    ("createdAt seconds", _with("data.createdAt", 1694357675), "data[1].data.createdAt"),
    ("createdAt float", _with("data.createdAt", 1694357675000.5), "data[1].data.createdAt"),
    ("createdAt string", _with("data.createdAt", "1694357675000"), "data[1].data.createdAt"),
    ("createdAt microseconds", _with("data.createdAt", 1694357675000000), "data[1].data.createdAt"),
    ("updatedAt missing", _with("data.updatedAt", DEL), "data[1].data.updatedAt"),
    ("updatedAt null", _with("data.updatedAt", None), "data[1].data.updatedAt"),
    ("updatedAt bool", _with("data.updatedAt", True), "data[1].data.updatedAt"),
    ("extra record key", _with("data.extra", 1), "data[1].data has unknown field(s): extra"),
]


@pytest.mark.parametrize(("bad", "reason"), [(b, r) for _, b, r in BAD_UPDATES], ids=[n for n, _, _ in BAD_UPDATES])
def test_invalid_update_rejects_the_whole_batch(
    sandbox: SandboxServer, session: requests.Session, bad: Any, reason: str
) -> None:
    r = post_updates(session, sandbox, [update("ok"), bad, update("ok2")])
    assert r.status_code == 400
    body = r.json()
    assert body["statusCode"] == 400
    assert body["error"] == "Bad Request"
    assert body["message"].startswith("Update reception failed: ")
    assert reason in body["message"]
    assert sandbox.rows(1, "user") == []
    assert sandbox.received() == []
    assert sandbox.stats()["rejected_requests"] == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"updates": []}', "unknown field"),
        (b"{}", "body.data must be an array"),
        (b'{"data": {}}', "body.data must be an array"),
        (b'{"data": null}', "body.data must be an array"),
    ],
)
def test_malformed_update_body(sandbox: SandboxServer, session: requests.Session, body: bytes, reason: str) -> None:
    r = session.post(f"{sandbox.url}/client-data/update", data=body, timeout=10)
    assert r.status_code == 400
    assert r.json()["message"].startswith("Update reception failed: ")
    assert reason in r.json()["message"]


GOOD_EVENT = {"brandId": 1, "userId": "553", "name": "ORDER_INITIATED", "value": 4000}
BAD_EVENTS = [
    ("not an object", "x", "data[1] must be an object"),
    ("brandId missing", {k: v for k, v in GOOD_EVENT.items() if k != "brandId"}, "data[1].brandId"),
    ("brandId string", {**GOOD_EVENT, "brandId": "1"}, "data[1].brandId"),
    ("brandId bool", {**GOOD_EVENT, "brandId": True}, "data[1].brandId"),
    ("userId missing", {k: v for k, v in GOOD_EVENT.items() if k != "userId"}, "data[1].userId"),
    ("userId empty", {**GOOD_EVENT, "userId": ""}, "data[1].userId"),
    ("userId null", {**GOOD_EVENT, "userId": None}, "data[1].userId"),
    ("userId bool", {**GOOD_EVENT, "userId": True}, "data[1].userId"),
    ("userId number", {**GOOD_EVENT, "userId": 553}, "data[1].userId must be a non-empty string"),
    ("name missing", {k: v for k, v in GOOD_EVENT.items() if k != "name"}, "data[1].name"),
    ("name empty", {**GOOD_EVENT, "name": ""}, "data[1].name"),
    ("name number", {**GOOD_EVENT, "name": 5}, "data[1].name"),
    ("extra key", {**GOOD_EVENT, "ts": 1}, "unknown field(s): ts"),
    ("extra key, no value", {"brandId": 1, "userId": "1", "name": "X", "ts": 1}, "unknown field(s): ts"),
]


@pytest.mark.parametrize(("bad", "reason"), [(b, r) for _, b, r in BAD_EVENTS], ids=[n for n, _, _ in BAD_EVENTS])
def test_invalid_event_rejects_the_whole_batch(
    sandbox: SandboxServer, session: requests.Session, bad: Any, reason: str
) -> None:
    r = session.post(f"{sandbox.url}/client-data/event", json={"data": [GOOD_EVENT, bad]}, timeout=10)
    assert r.status_code == 400
    assert r.json()["message"].startswith("Event reception failed: ")
    assert reason in r.json()["message"]
    assert r.json()["error"] == "Bad Request"
    assert sandbox.events(1) == []


def test_unknown_route_and_wrong_method(sandbox: SandboxServer, session: requests.Session) -> None:
    r = session.post(f"{sandbox.url}/client-data/other", json={"data": []}, timeout=10)
    assert r.status_code == 404
    assert r.json()["statusCode"] == 404
    r = session.get(f"{sandbox.url}/client-data/update", timeout=10)
    assert r.status_code == 404
    # the connection is still usable after errors
    assert post_updates(session, sandbox, []).status_code == 200


def test_body_limit(stopchurn_sandbox_factory: Callable[..., SandboxServer], session: requests.Session) -> None:
    sb = stopchurn_sandbox_factory(max_body_bytes=1000)
    r = post_updates(session, sb, [update(i, blob="x" * 100) for i in range(20)])
    assert r.status_code == 413
    assert r.json()["statusCode"] == 413
    assert sb.rows(1, "user") == []
    assert post_updates(session, sb, [update(1)]).status_code == 200
    assert sb.stats()["rejected_requests"] == 1


TOO_LARGE = {"statusCode": 413, "message": "Payload too large", "error": "Payload Too Large"}


def test_fault_config_body_limit_is_exact_and_applies_nothing(
    sandbox: SandboxServer, session: requests.Session
) -> None:
    body = orjson.dumps({"data": [update(1), update(2)]})
    sandbox.set_faults(FaultConfig(max_body_bytes=len(body) - 1))
    assert sandbox.max_body_bytes == len(body) - 1
    r = session.post(f"{sandbox.url}/client-data/update", data=body, timeout=10)
    assert r.status_code == 413
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == TOO_LARGE
    assert sandbox.rows(1, "user") == []

    sandbox.set_faults(FaultConfig(max_body_bytes=len(body)))  # a body of exactly the limit is accepted
    assert session.post(f"{sandbox.url}/client-data/update", data=body, timeout=10).status_code == 200
    assert [row["id"] for row in sandbox.rows(1, "user")] == [1, 2]

    sandbox.set_faults(FaultConfig(max_body_bytes=10))  # the event route too, and a chunked body
    r = session.post(f"{sandbox.url}/client-data/event", json={"data": [GOOD_EVENT]}, timeout=10)
    assert (r.status_code, r.json()) == (413, TOO_LARGE)
    r = session.post(f"{sandbox.url}/client-data/update", data=iter([body[:8], body[8:]]), timeout=10)
    assert (r.status_code, r.json()) == (413, TOO_LARGE)
    assert sandbox.events(1) == []

    stats = sandbox.stats()
    assert stats["too_large_requests"] == 3
    assert stats["rejected_requests"] == 3
    assert stats["accepted_requests"] == 1
    assert stats["requests"] == 4
    assert stats["faults"] == dict.fromkeys(stats["faults"], 0)  # a 413 is not a random fault


def test_body_limit_takes_no_draw_and_keeps_queued_responses(
    stopchurn_sandbox_factory: Callable[..., SandboxServer], session: requests.Session
) -> None:
    faults = FaultConfig(seed=4, error_rate=0.3, throttle_rate=0.3)
    plain = stopchurn_sandbox_factory(faults=faults)
    limited = stopchurn_sandbox_factory(faults=replace(faults, max_body_bytes=500))
    big = [update(i, blob="x" * 100) for i in range(10)]
    expected = [post_updates(session, plain, [update(i)]).status_code for i in range(20)]
    assert {200, 429, 500} <= set(expected)
    seen = []
    with requests.Session() as s:
        s.headers.update(AUTH)
        for i in range(20):
            assert post_updates(s, limited, big).status_code == 413  # interleaved, deterministic
            seen.append(post_updates(s, limited, [update(i)]).status_code)
        assert seen == expected
        limited.queue_response(202, {"queued": True})
        assert post_updates(s, limited, big).status_code == 413
        assert post_updates(s, limited, [update(1)]).json() == {"queued": True}  # still waiting for its turn
    assert limited.stats()["too_large_requests"] == 21


def test_body_limit_shorthand_and_validation(
    stopchurn_sandbox_factory: Callable[..., SandboxServer], session: requests.Session
) -> None:
    sb = stopchurn_sandbox_factory(max_body_bytes=1000, faults=FaultConfig(seed=3, error_rate=0.1))
    assert sb.faults == FaultConfig(seed=3, error_rate=0.1, max_body_bytes=1000)
    assert sb.max_body_bytes == 1000
    assert requests.get(f"{sb.url}/_sandbox/faults", timeout=10).json()["max_body_bytes"] == 1000
    r = requests.put(f"{sb.url}/_sandbox/faults", json={"max_body_bytes": 20}, timeout=10)
    assert r.status_code == 200
    assert sb.max_body_bytes == 20
    assert post_updates(session, sb, [update(1)]).status_code == 413
    for bad in (-1, 1.5, "100", True):
        r = requests.put(f"{sb.url}/_sandbox/faults", json={"max_body_bytes": bad}, timeout=10)
        assert r.status_code == 400
        assert "max_body_bytes" in r.json()["message"]
    assert sb.max_body_bytes == 20
    sb.set_faults(FaultConfig())  # the limit is part of the fault configuration
    assert sb.max_body_bytes is None
    assert SandboxServer(max_body_bytes=5, faults=FaultConfig(max_body_bytes=5)).max_body_bytes == 5
    with pytest.raises(ValueError):
        SandboxServer(max_body_bytes=5, faults=FaultConfig(max_body_bytes=6))
    with pytest.raises(ValueError):
        SandboxServer(max_body_bytes=-1)


def test_reject_ids(sandbox: SandboxServer, session: requests.Session) -> None:
    sandbox.reject_ids({"42"})
    r = post_updates(session, sandbox, [update(1), update(42)])
    assert r.status_code == 400
    assert r.json()["message"] == "Update reception failed: row 42 rejected by sandbox rule"
    r = post_updates(session, sandbox, [update("42", kind="delete")])
    assert r.status_code == 400
    assert sandbox.rows(1, "user") == []
    assert post_updates(session, sandbox, [update(1), update(43)]).status_code == 200
    sandbox.reject_ids(set())
    assert post_updates(session, sandbox, [update(42)]).status_code == 200
    assert [r["id"] for r in sandbox.rows(1, "user")] == [1, 42, 43]


def test_fail_ids_answer_500_on_every_try(sandbox: SandboxServer, session: requests.Session) -> None:
    sandbox.fail_ids([42])
    sandbox.reject_ids([42])  # a failing row fails before any rejection rule
    for _ in range(3):
        r = post_updates(session, sandbox, [update(1), update(42)])
        assert (r.status_code, r.json()["message"]) == (500, "Internal server error")
    assert sandbox.rows(1, "user") == []
    assert sandbox.stats()["faults"]["failing_id"] == 3
    assert post_updates(session, sandbox, [update(1)]).status_code == 200
    sandbox.reject_ids([])
    sandbox.fail_ids([])
    assert post_updates(session, sandbox, [update(42)]).status_code == 200
    assert [r["id"] for r in sandbox.rows(1, "user")] == [1, 42]
    sandbox.fail_ids(["1"])
    sandbox.reset()
    assert post_updates(session, sandbox, [update(1)]).status_code == 200


# ------------------------------------------------------------------------------------- scripted responses


def test_queue_response_fifo(sandbox: SandboxServer, session: requests.Session) -> None:
    sandbox.queue_response(429, {"statusCode": 429, "message": "slow down"}, {"Retry-After": "3"})
    sandbox.queue_response(503, "<html>down</html>", {"Content-Type": "text/html"})
    sandbox.queue_response(200, b"raw")
    sandbox.queue_response(204, None)

    r = post_updates(session, sandbox, [update(1)])
    assert (r.status_code, r.headers["Retry-After"], r.json()["message"]) == (429, "3", "slow down")
    r = post_updates(session, sandbox, [update(1)])
    assert (r.status_code, r.headers["Content-Type"], r.text) == (503, "text/html", "<html>down</html>")
    r = post_updates(session, sandbox, [update(1)])
    assert (r.status_code, r.content) == (200, b"raw")
    r = post_updates(session, sandbox, [update(1)])
    assert (r.status_code, r.content) == (204, b"")
    assert sandbox.rows(1, "user") == []

    r = post_updates(session, sandbox, [update(1)])
    assert r.status_code == 200
    assert r.json()["message"] == "Updates received"
    assert [row["id"] for row in sandbox.rows(1, "user")] == [1]


def test_queue_pass_lets_requests_through_before_the_scripted_ones(
    sandbox: SandboxServer, session: requests.Session
) -> None:
    sandbox.queue_pass(2)
    sandbox.queue_response(500, {"statusCode": 500, "message": "scripted"})
    statuses = [post_updates(session, sandbox, [update(i)]).status_code for i in range(4)]
    assert statuses == [200, 200, 500, 200]
    assert [r["id"] for r in sandbox.rows(1, "user")] == [0, 1, 3]
    with pytest.raises(ValueError, match="count"):
        sandbox.queue_pass(-1)


def test_queue_response_bypasses_auth_and_zero_drops(sandbox: SandboxServer) -> None:
    sandbox.queue_response(200, {"ok": True})
    r = requests.post(f"{sandbox.url}/client-data/update", json={"data": []}, timeout=10)
    assert r.json() == {"ok": True}
    sandbox.queue_response(0, None)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{sandbox.url}/client-data/update", json={"data": [update(1)]}, headers=AUTH, timeout=10)
    assert sandbox.rows(1, "user") == []


def test_queue_response_validates_status(sandbox: SandboxServer) -> None:
    with pytest.raises(ValueError):
        sandbox.queue_response(42, None)


# ---------------------------------------------------------------------------------------------- faults


def _outcomes(sb: SandboxServer, n: int) -> list[int | str]:
    """Send ``n`` sequential one-row requests and return each status code, or "drop"."""
    seen: list[int | str] = []
    with requests.Session() as s:
        s.headers.update(AUTH)
        for i in range(n):
            try:
                seen.append(post_updates(s, sb, [update(i)]).status_code)
            except requests.ConnectionError:
                seen.append("drop")
    return seen


def test_faults_are_deterministic_per_seed(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> None:
    faults = FaultConfig(seed=11, error_rate=0.2, throttle_rate=0.2, drop_rate=0.1, drop_after_apply_rate=0.1)
    first = stopchurn_sandbox_factory(faults=faults)
    second = stopchurn_sandbox_factory(faults=faults)
    a, b = _outcomes(first, 60), _outcomes(second, 60)
    assert a == b
    assert {500, 429, 200, "drop"} <= set(a)
    assert first.stats()["faults"] == second.stats()["faults"]
    counted = first.stats()["faults"]
    assert counted["error"] == a.count(500)
    assert counted["throttle"] == a.count(429)
    assert counted["drop"] + counted["drop_after_apply"] == a.count("drop")
    # only the 200s and the lost acknowledgements were applied
    assert len(first.rows(1, "user")) == a.count(200) + counted["drop_after_apply"]

    first.reset()
    assert _outcomes(first, 60) == a
    first.set_faults(FaultConfig(seed=12, error_rate=0.2, throttle_rate=0.2, drop_rate=0.1))
    assert _outcomes(first, 60) != a


def test_throttle_carries_retry_after(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> None:
    for retry_after, header in ((1.0, "1"), (2, "2"), (0.5, "0.5"), (2.25, "2.25")):
        sb = stopchurn_sandbox_factory(faults=FaultConfig(throttle_rate=1.0, retry_after=retry_after))
        r = requests.post(f"{sb.url}/client-data/update", json={"data": [update(1)]}, headers=AUTH, timeout=10)
        assert r.status_code == 429
        assert r.headers["Retry-After"] == header
        assert r.json()["statusCode"] == 429
        assert sb.rows(1, "user") == []


def test_error_fault_json_and_html(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> None:
    sb = stopchurn_sandbox_factory(faults=FaultConfig(error_rate=1.0))
    r = requests.post(f"{sb.url}/client-data/update", json={"data": [update(1)]}, headers=AUTH, timeout=10)
    assert r.status_code == 500
    assert r.json()["statusCode"] == 500
    sb.set_faults(FaultConfig(error_rate=1.0, html_errors=True))
    r = requests.post(f"{sb.url}/client-data/update", json={"data": [update(1)]}, headers=AUTH, timeout=10)
    assert r.status_code == 500
    assert r.headers["Content-Type"].startswith("text/html")
    assert "<html>" in r.text
    assert sb.rows(1, "user") == []
    assert sb.stats()["faults"]["error"] == 2


def test_html_ok_fault_is_a_proxy_page(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> None:
    sb = stopchurn_sandbox_factory(faults=FaultConfig(html_ok_rate=1.0), record=True)
    r = requests.post(f"{sb.url}/client-data/update", json={"data": [update(1)]}, headers=AUTH, timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert r.text.startswith("<!DOCTYPE html>")
    assert "</html>" in r.text
    r = requests.post(f"{sb.url}/client-data/event", json={"data": [GOOD_EVENT]}, timeout=10)  # no key: a proxy
    assert (r.status_code, r.headers["Content-Type"].split(";")[0]) == (200, "text/html")
    assert sb.rows(1, "user") == []
    assert sb.events(1) == []
    assert sb.received() == []
    stats = sb.stats()
    assert stats["faults"]["html_ok"] == 2
    assert (stats["requests"], stats["accepted_requests"], stats["unauthorized"]) == (2, 0, 0)


def test_html_ok_is_one_band_of_the_draw(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> None:
    faults = FaultConfig(seed=21, error_rate=0.2, html_ok_rate=0.3, throttle_rate=0.1)
    runs = []
    for sb in (stopchurn_sandbox_factory(faults=faults), stopchurn_sandbox_factory(faults=faults)):
        kinds = []
        with requests.Session() as s:
            s.headers.update(AUTH)
            for i in range(80):
                r = post_updates(s, sb, [update(i)])
                html = r.headers.get("Content-Type", "").startswith("text/html")
                kinds.append("html_ok" if r.status_code == 200 and html else r.status_code)
        runs.append(kinds)
        counted = sb.stats()["faults"]
        assert counted["html_ok"] == kinds.count("html_ok") > 0
        assert counted["error"] == kinds.count(500) > 0
        assert counted["throttle"] == kinds.count(429) > 0
        assert len(sb.rows(1, "user")) == kinds.count(200) > 0  # only the real acknowledgements applied
    assert runs[0] == runs[1]


def test_drop_closes_connection_without_applying(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> None:
    sb = stopchurn_sandbox_factory(faults=FaultConfig(drop_rate=1.0))
    with socket.create_connection(("127.0.0.1", sb.port), timeout=10) as conn:
        body = orjson.dumps({"data": [update(1)]})
        head = (
            f"POST /client-data/update HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        conn.sendall(head.encode() + body)
        assert conn.recv(1024) == b""  # closed, no bytes of a response
    assert sb.rows(1, "user") == []
    assert sb.stats()["faults"]["drop"] == 1


def test_drop_after_apply_loses_the_ack(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> None:
    sb = stopchurn_sandbox_factory(faults=FaultConfig(drop_after_apply_rate=1.0))
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{sb.url}/client-data/update", json={"data": [update(1)]}, headers=AUTH, timeout=10)
    assert sb.rows(1, "user") == [{"id": 1}]
    assert sb.stats()["faults"]["drop_after_apply"] == 1


def test_slow_requests_time_clients_out(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> None:
    sb = stopchurn_sandbox_factory(faults=FaultConfig(slow_rate=1.0, slow_seconds=0.5))
    with pytest.raises(requests.Timeout):
        requests.post(f"{sb.url}/client-data/update", json={"data": [update(1)]}, headers=AUTH, timeout=0.1)
    r = requests.post(f"{sb.url}/client-data/update", json={"data": [update(2)]}, headers=AUTH, timeout=10)
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while len(sb.rows(1, "user")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [row["id"] for row in sb.rows(1, "user")] == [1, 2]  # the timed-out request was still processed


def test_latency_is_added_to_api_requests_only(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> None:
    sb = stopchurn_sandbox_factory(faults=FaultConfig(latency=0.2))
    started = time.monotonic()
    requests.post(f"{sb.url}/client-data/update", json={"data": []}, headers=AUTH, timeout=10)
    assert time.monotonic() - started >= 0.2


def test_faults_never_touch_the_inspection_api(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> None:
    sb = stopchurn_sandbox_factory(faults=FaultConfig(error_rate=0.5, drop_rate=0.5))
    for _ in range(20):
        assert requests.get(f"{sb.url}/_sandbox/stats", timeout=10).status_code == 200
    assert sb.stats()["requests"] == 0


def test_fault_config_validation() -> None:
    with pytest.raises(ValueError):
        FaultConfig(error_rate=1.5)
    with pytest.raises(ValueError):
        FaultConfig(error_rate=0.6, drop_rate=0.6)
    with pytest.raises(ValueError):
        FaultConfig(retry_after=-1)
    with pytest.raises(ValueError):
        FaultConfig(html_errors=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FaultConfig.from_dict({"error_rat": 0.1})
    config = FaultConfig.from_dict({"seed": 3, "throttle_rate": 0.5})
    assert config == FaultConfig(seed=3, throttle_rate=0.5)
    assert FaultConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"html_ok_rate": -0.1},
        {"html_ok_rate": 1.5},
        {"html_ok_rate": "0.5"},
        {"html_ok_rate": True},
        {"html_ok_rate": float("nan")},
        {"html_ok_rate": 0.6, "error_rate": 0.5},  # the bands add up to more than 1
        {"max_body_bytes": -1},
        {"max_body_bytes": 1.5},
        {"max_body_bytes": 100.0},
        {"max_body_bytes": "100"},
        {"max_body_bytes": True},
    ],
)
def test_new_fault_fields_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"html_ok_rate|max_body_bytes|add up"):
        FaultConfig(**kwargs)


def test_new_fault_fields_round_trip() -> None:
    config = FaultConfig(seed=2, html_ok_rate=0.25, error_rate=0.75, max_body_bytes=0)
    assert config.injects_faults
    assert not FaultConfig(max_body_bytes=100).injects_faults  # a limit is not a random fault
    assert FaultConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert FaultConfig().to_dict()["max_body_bytes"] is None
    assert FaultConfig().to_dict()["html_ok_rate"] == 0.0


# ----------------------------------------------------------------------------------------- inspection API


def test_inspection_api_over_http(sandbox: SandboxServer, session: requests.Session) -> None:
    base = f"{sandbox.url}/_sandbox"
    post_updates(session, sandbox, [update("a"), update(1, table="my table")])
    session.post(f"{sandbox.url}/client-data/event", json={"data": [GOOD_EVENT]}, timeout=10)

    assert requests.get(f"{base}/health", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{base}/tables/1/user", timeout=10).json() == {"rows": [{"id": "a"}], "count": 1}
    assert requests.get(f"{base}/tables/1/my%20table", timeout=10).json()["count"] == 1
    assert requests.get(f"{base}/tables/2/user", timeout=10).json() == {"rows": [], "count": 0}
    assert requests.get(f"{base}/tables/x/user", timeout=10).status_code == 404
    assert requests.get(f"{base}/events/1", timeout=10).json() == {"events": [GOOD_EVENT], "count": 1}
    assert requests.get(f"{base}/received", timeout=10).json() == {
        "received": [["insert", 1, "user", "a"], ["insert", 1, "my table", 1]]
    }
    stats = requests.get(f"{base}/stats", timeout=10).json()
    assert stats == sandbox.stats()
    assert stats["requests"] == 2
    assert requests.get(f"{base}/nothing", timeout=10).status_code == 404

    r = requests.put(f"{base}/faults", json={"seed": 5, "throttle_rate": 1.0, "retry_after": 2}, timeout=10)
    assert r.status_code == 200
    assert sandbox.faults == FaultConfig(seed=5, throttle_rate=1.0, retry_after=2)
    assert requests.get(f"{base}/faults", timeout=10).json()["throttle_rate"] == 1.0
    assert post_updates(session, sandbox, [update("b")]).status_code == 429
    assert requests.put(f"{base}/faults", json={"error_rate": 7}, timeout=10).status_code == 400
    assert requests.put(f"{base}/faults", json={"bogus": 1}, timeout=10).status_code == 400
    assert requests.put(f"{base}/faults", data=b"[]", timeout=10).status_code == 400
    requests.put(f"{base}/faults", json={}, timeout=10)

    assert requests.post(f"{base}/reset", timeout=10).status_code == 200
    assert sandbox.rows(1, "user") == []
    assert sandbox.stats()["requests"] == 0
    assert sandbox.received() == []


def test_reset_clears_everything(sandbox: SandboxServer, session: requests.Session) -> None:
    post_updates(session, sandbox, [update(1)])
    sandbox.queue_response(500, None)
    sandbox.reject_ids({"2"})
    sandbox.reset()
    assert sandbox.rows(1, "user") == []
    assert sandbox.received() == []
    assert sandbox.stats()["requests"] == 0
    assert post_updates(session, sandbox, [update(2)]).status_code == 200


def test_received_needs_record(stopchurn_sandbox: SandboxServer) -> None:
    assert stopchurn_sandbox.token == TOKEN
    with pytest.raises(RuntimeError):
        stopchurn_sandbox.received()
    assert requests.get(f"{stopchurn_sandbox.url}/_sandbox/received", timeout=10).status_code == 409


# --------------------------------------------------------------------------------------- lifecycle, speed


def test_lifecycle_without_with() -> None:
    sb = SandboxServer(token=TOKEN)
    with pytest.raises(RuntimeError):
        _ = sb.url
    sb.start()
    try:
        port = sb.port
        assert sb.url == f"http://127.0.0.1:{port}"
        with requests.Session() as s:
            s.headers.update(AUTH)
            assert post_updates(s, sb, [update(1)]).status_code == 200
            sb.stop()
            sb.stop()
            assert not sb.running
            with pytest.raises(requests.ConnectionError):  # the idle keep-alive connection was closed too
                post_updates(s, sb, [update(2)])
            sb.start()  # same port, state kept
            assert sb.port == port
            assert post_updates(s, sb, [update(3)]).status_code == 200
        assert [r["id"] for r in sb.rows(1, "user")] == [1, 3]
    finally:
        sb.stop()


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        sb = SandboxServer(token=TOKEN, host="::1").start()
    except OSError:
        pytest.skip("::1 cannot be bound here")
    try:
        assert sb.url.startswith("http://[::1]:")
        r = requests.post(f"{sb.url}/client-data/update", json={"data": [update(1)]}, headers=AUTH, timeout=10)
        assert r.status_code == 200
    finally:
        sb.stop()


def test_concurrent_clients_are_all_counted(sandbox: SandboxServer) -> None:
    errors: queue.Queue[BaseException] = queue.Queue()

    def client(worker: int) -> None:
        try:
            with requests.Session() as s:
                s.headers.update(AUTH)
                for i in range(50):
                    r = post_updates(s, sandbox, [update(f"{worker}-{i}"), update(worker * 1000 + i)])
                    assert r.status_code == 200
        except BaseException as exc:
            errors.put(exc)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors.empty(), errors.get()
    stats = sandbox.stats()
    assert stats["requests"] == stats["accepted_requests"] == 200
    assert stats["updates"]["insert"] == 400
    assert len(sandbox.rows(1, "user")) == 400
    assert len(sandbox.received()) == 400


def test_keep_alive_throughput_of_large_batches(sandbox: SandboxServer, session: requests.Session) -> None:
    body = orjson.dumps({"data": [update(str(i), email=f"u{i}@example.com", status="active") for i in range(1000)]})
    session.headers["Content-Type"] = "application/json"
    started = time.perf_counter()
    for _ in range(200):
        assert session.post(f"{sandbox.url}/client-data/update", data=body, timeout=30).status_code == 200
    elapsed = time.perf_counter() - started
    print(f"200 requests x 1,000 updates in {elapsed:.2f}s: {200 / elapsed:.0f} requests/s")
    assert sandbox.stats()["updates"]["insert"] == 200_000
    assert len(sandbox.rows(1, "user")) == 1000


# -------------------------------------------------------------------------------------- CLI and packaging


def _read_line(stream: Any, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


def test_cli_serves_until_terminated() -> None:
    cmd = [sys.executable, "-m", "airflow_provider_stopchurn.sandbox", "--port", "0", "--token", TOKEN]
    cmd += ["--seed", "3", "--retry-after", "2", "--record", "--max-body-bytes", "100000", "--html-ok-rate", "0.0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = _read_line(proc.stdout, timeout=30)
        assert "http://127.0.0.1:" in line, line
        url = line.split()[-1]
        r = requests.post(f"{url}/client-data/update", json={"data": [update(1)]}, headers=AUTH, timeout=10)
        assert r.status_code == 200
        assert requests.get(f"{url}/_sandbox/tables/1/user", timeout=10).json()["count"] == 1
        faults = requests.get(f"{url}/_sandbox/faults", timeout=10).json()
        assert (faults["retry_after"], faults["max_body_bytes"], faults["html_ok_rate"]) == (2, 100000, 0.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert proc.stderr is not None
        assert "warning" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=15)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--error-rate", "2"], "error_rate"),
        (["--html-ok-rate", "2"], "html_ok_rate"),
        (["--html-ok-rate", "0.6", "--error-rate", "0.6"], "add up"),
        (["--max-body-bytes", "-1"], "max_body_bytes"),
    ],
)
def test_cli_rejects_bad_fault_rates(args: list[str], field: str) -> None:
    cmd = [sys.executable, "-m", "airflow_provider_stopchurn.sandbox", "--port", "0", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert field in result.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("example.com", False)],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert _is_loopback(host) is loopback


def test_import_does_not_load_airflow() -> None:
    code = (
        "import sys, json; import airflow_provider_stopchurn.sandbox, airflow_provider_stopchurn.sandbox.server;"
        "import airflow_provider_stopchurn.sandbox.__main__;"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(result.stdout) == []


def test_freeze_gc_keeps_held_rows_out_of_the_collector(
    stopchurn_sandbox_factory: Callable[..., SandboxServer], session: requests.Session
) -> None:
    import gc

    sb = stopchurn_sandbox_factory(freeze_gc=True)
    try:
        gc.unfreeze()
        assert post_updates(session, sb, [update(i) for i in range(50)]).status_code == 200
        assert gc.get_freeze_count() > 0
        assert len(sb.rows(1, "user")) == 50
    finally:
        gc.unfreeze()


def test_freeze_gc_is_off_by_default(sandbox: SandboxServer, session: requests.Session) -> None:
    import gc

    gc.unfreeze()
    assert post_updates(session, sandbox, [update(1)]).status_code == 200
    assert gc.get_freeze_count() == 0
