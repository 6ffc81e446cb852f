"""The on-call CLI, ``stopchurn``, and the run history, against real stores: local folders and ``memory://``.

Every command runs in-process through ``cli.main(argv)`` on both kinds of store; the console script runs in
subprocesses (a settle after a SIGKILLed run, a status that must not import Airflow), and ``airflow stopchurn``
once through Airflow's own CLI. The runs before each command are real syncs against the sandbox on 127.0.0.1;
nothing of the project is mocked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest
from dying_fs import DieAfter, DyingMemoryFileSystem, Killed
from helpers_sync import (
    BRAND,
    T0,
    TABLE,
    Churn,
    assert_sandbox_matches,
    deterministic_table,
    expected_rows,
    make_client,
    options,
    sandbox_rows,
    tree_digest,
    update_requests,
)
from upath import UPath
from worker_harness import accepted_or_ended, reaped, start_worker

from airflow_provider_stopchurn import cli
from airflow_provider_stopchurn.exceptions import SafeguardError, SnapshotLockedError, StopChurnRejectedError
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.store import CREATED_AT, HASH_1, HISTORY_LIMIT, SnapshotStore
from airflow_provider_stopchurn.update.diff import DIRTY_HASH
from airflow_provider_stopchurn.update.sync import SyncSummary, run_sync

TESTS = Path(__file__).resolve().parent
STOPCHURN = Path(sys.executable).with_name("stopchurn")  # the console script of this virtualenv
WORKER = "crash_worker.py"
KEY_VAR = "STOPCHURN_CLI_TEST_KEY"


@dataclass
class Where:
    """A snapshot location as the CLI gets it (``uri``) and as the tests open it (``root``)."""

    kind: str
    uri: str
    root: Any

    def store(self) -> SnapshotStore:
        return SnapshotStore(self.root, BRAND, TABLE)


@pytest.fixture(params=["local", "memory"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    if request.param == "local":
        root = tmp_path / "snapshots"
        return Where("local", str(root), root)
    uri = f"memory://stopchurn-cli/{uuid.uuid4().hex}"
    return Where("memory", uri, UPath(uri))


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


@pytest.fixture
def stopchurn(capsys: pytest.CaptureFixture[str], where: Where) -> Callable[..., Result]:
    """``stopchurn(command, *more)`` runs ``cli.main`` on the test's store and returns code, stdout, stderr."""

    def invoke(command: str, *more: str, table: str = TABLE) -> Result:
        capsys.readouterr()
        code = cli.main([command, where.uri, "--brand", str(BRAND), "--table", table, *more])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return invoke


class _Terminal(io.StringIO):
    """A stdin that is a terminal, with the person's answer already typed."""

    def isatty(self) -> bool:
        return True


def _synced(sb: SandboxServer, store: SnapshotStore, runs: int = 2, **opts: Any) -> tuple[Churn, list[SyncSummary]]:
    """``runs`` syncs of a churning table; ``churn.frame`` is the table the last one delivered."""
    churn = Churn(41, 300)
    client = make_client(sb)
    summaries = []
    for run in range(runs):
        frame = churn.frame if run == 0 else churn.step()
        summaries.append(run_sync(frame, store, client, options(chunk_size=50, **opts), run_ms=T0 + run))
    return churn, summaries


def _one_line_error(result: Result) -> str:
    assert result.out == ""
    assert result.err.count("\n") == 1 and result.err.startswith("stopchurn "), result.err
    return result.err


# --- status and history ---------------------------------------------------------------------------------------
def test_status_and_history_of_a_synced_table(
    sb: SandboxServer, where: Where, stopchurn: Callable[..., Result]
) -> None:
    store = where.store()
    _, summaries = _synced(sb, store)

    status = stopchurn("status", "--json").json()
    committed = status["committed"]
    assert committed["rows"] == store.read_committed().frame.height  # type: ignore[union-attr]
    assert committed["key_columns"] == ["id"]
    assert committed["columns"]["id"] == "int" and committed["columns"]["score"] == "float"
    assert committed["committed_at"] and committed["version"]
    assert status["pending_plan"] is None and status["lock"] is None
    assert status["quarantine"]["rows"] == 0
    last = status["last_run"]
    assert (last["kind"], last["status"], last["version"]) == ("sync", "success", committed["version"])

    text = stopchurn("status")
    assert text.code == 0
    for words in (f"brand {BRAND} table '{TABLE}'", committed["version"], f"{committed['rows']} rows"):
        assert words in text.out, (words, text.out)
    assert "id (int, key)" in text.out and "Pending plan: none" in text.out and "Lock:         free" in text.out

    runs = stopchurn("history", "--json", "-n", "5").json()
    assert len(runs) == 2  # newest first
    for run, summary in zip(runs, reversed(summaries), strict=True):
        for field in ("inserted", "updated", "deleted", "unchanged", "chunks", "bytes", "requests"):
            assert run[field] == getattr(summary, field), field
        assert run["http_retries"] == summary.retries
        assert run["status"] == "success" and run["error"] is None and run["rejected"] == 0
        assert run["holder"] == "stopchurn-sync" and run["duration_s"] >= 0
        assert run["finished_at"] >= run["started_at"]
    assert runs[0]["version"] == committed["version"] and runs[0]["rows"] == committed["rows"]
    assert runs[0]["finished_at"] > runs[1]["finished_at"]

    table = stopchurn("history", "-n", "1")
    assert table.code == 0
    header, row = table.out.splitlines()
    assert header.split()[:6] == ["finished", "(UTC)", "kind", "status", "try", "ins"]
    assert "success" in row and str(summaries[-1].inserted) in row.split()


def test_history_records_every_run_failures_included(sb: SandboxServer, where: Where) -> None:
    store = where.store()
    churn, _ = _synced(sb, store, runs=1)
    client = make_client(sb)
    assert len(store.read_history()) == 1

    # nothing changed: nothing committed, the run recorded (its record is all that is written)
    digest = tree_digest(where.root)
    run_sync(churn.frame, store, client, options(), run_ms=T0 + 1)
    assert {k: v for k, v in tree_digest(where.root).items() if "/history/" not in k} == {
        k: v for k, v in digest.items() if "/history/" not in k
    }
    assert store.read_history(1)[0]["status"] == "success" and len(store.read_history()) == 2
    # a safeguard stops the run before anything is sent: recorded as failed, with its first line
    with pytest.raises(SafeguardError) as guard:
        run_sync(churn.frame.head(10), store, client, options(), run_ms=T0 + 2)
    assert len(store.read_history()) == 3
    assert store.read_history(1)[0]["error"] == str(guard.value).splitlines()[0]

    # a rejection after some chunks were acknowledged: settled, committed, recorded as failed
    frame = churn.step()
    sb.reject_ids({int(frame["id"].max())})  # the last insert, in the last chunk
    with pytest.raises(StopChurnRejectedError) as info:
        run_sync(frame, store, client, options(chunk_size=10, max_concurrent_requests=1), run_ms=T0 + 3)
    newest = store.read_history(1)[0]
    assert newest["status"] == "failed" and newest["error_type"] == "StopChurnRejectedError"
    assert newest["error"] == str(info.value).splitlines()[0]
    assert newest["chunks"] > 1 and newest["requests"] == newest["chunks"]
    assert newest["inserted"] + newest["updated"] + newest["deleted"] > 0
    current = store.read_current()
    assert current is not None and newest["version"] == current["version"]


def test_history_keeps_the_newest_records(sb: SandboxServer, where: Where, stopchurn: Callable[..., Result]) -> None:
    store = where.store()
    store.history_limit = 3  # the bound, smaller for this store; HISTORY_LIMIT is tested below
    _, summaries = _synced(sb, store, runs=5)
    runs = store.read_history()
    assert len(runs) == 3
    assert [r["inserted"] for r in runs] == [s.inserted for s in reversed(summaries[-3:])]
    assert len(stopchurn("history", "--json", "-n", "50").json()) == 3
    assert [r["version"] for r in store.read_history(2)] == [r["version"] for r in runs[:2]]


def test_history_bound_is_a_thousand_runs() -> None:
    assert HISTORY_LIMIT == 1000 == SnapshotStore.history_limit
    store = SnapshotStore(UPath(f"memory://stopchurn-cli/{uuid.uuid4().hex}"), BRAND, TABLE)
    for n in range(HISTORY_LIMIT + 5):
        store.append_history({"n": n})
    records = store.read_history()
    assert len(records) == HISTORY_LIMIT
    assert [r["n"] for r in records[:2]] == [HISTORY_LIMIT + 4, HISTORY_LIMIT + 3]
    assert records[-1]["n"] == 5  # the five oldest were removed
    assert len(store.backend.list_names("history")) == HISTORY_LIMIT


def test_history_record_names_no_key(sb: SandboxServer, where: Where) -> None:
    """The history holds counts and names only; the API key appears nowhere in it (see test_secrets_sync)."""
    store = where.store()
    _synced(sb, store, runs=2)
    text = json.dumps(store.read_history())
    assert sb.token not in text and "Bearer" not in text


# --- rejected rows ---------------------------------------------------------------------------------------------
def test_rejected_rows_with_reasons_and_export(
    sb: SandboxServer, where: Where, stopchurn: Callable[..., Result], tmp_path: Path
) -> None:
    store = where.store()
    churn, _ = _synced(sb, store, runs=1)
    frame = churn.step()
    bad = sorted(int(i) for i in frame["id"].nlargest(2))
    sb.reject_ids(set(bad))
    run_sync(frame, store, make_client(sb), options(on_rejected_rows="quarantine", chunk_size=50), run_ms=T0 + 1)

    status = stopchurn("status", "--json").json()
    assert status["quarantine"]["rows"] == 2 and status["quarantine"]["current"] is True
    assert status["last_run"]["rejected"] == 2
    assert "Quarantined:  2 rows rejected by the last committed plan" in stopchurn("status").out

    listed = stopchurn("rejected", "--json").json()
    assert listed["count"] == 2 and sorted(r["id"] for r in listed["rows"]) == bad
    assert all("rejected by sandbox rule" in r["reason"] for r in listed["rows"])
    assert all(r["plan_id"] == status["quarantine"]["plan_id"] for r in listed["rows"])
    assert all(r["update"]["type"] == "insert" for r in listed["rows"])

    text = stopchurn("rejected")
    assert text.code == 0 and text.out.startswith("2 rows rejected by StopChurn")
    assert all(f"id {i!r}: " in text.out for i in bad)

    as_csv, as_json = tmp_path / "rejected.csv", tmp_path / "rejected.JSON"
    assert "Wrote 2 rows" in stopchurn("rejected", "--export", str(as_csv)).out
    with as_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["id"]) for r in rows) == bad
    assert all("rejected by sandbox rule" in r["reason"] and json.loads(r["update"])["type"] == "insert" for r in rows)
    assert stopchurn("rejected", "--export", str(as_json), "--all").code == 0
    assert sorted(r["id"] for r in json.loads(as_json.read_text())) == bad

    wrong = stopchurn("rejected", "--export", str(tmp_path / "rejected.xlsx"))
    assert wrong.code == cli.USAGE and ".csv or .json" in _one_line_error(wrong)
    assert not (tmp_path / "rejected.xlsx").exists()


# --- unlock ----------------------------------------------------------------------------------------------------
def test_unlock_refuses_a_live_holder_on_this_host_then_forced(
    sb: SandboxServer, where: Where, stopchurn: Callable[..., Result]
) -> None:
    store = where.store()
    _synced(sb, store, runs=1)
    held = store.table_lock("nightly.sync run 42")
    held.acquire()  # held by this very process: alive on this host

    lock = stopchurn("status", "--json").json()["lock"]
    assert (lock["holder"], lock["state"], lock["pid"], lock["expired"]) == (
        "nightly.sync run 42",
        "alive",
        os.getpid(),
        False,
    )
    assert "its process is running on this host" in stopchurn("status").out

    refused = stopchurn("unlock", "--yes")
    assert refused.code == cli.ERROR and "still running on this host" in _one_line_error(refused)
    assert store.read_lock() is not None
    held.check()  # still its lock

    forced = stopchurn("unlock", "--yes", "--force", "--json").json()
    assert forced["unlocked"] is True and forced["lock"]["holder"] == "nightly.sync run 42"
    assert store.read_lock() is None
    with pytest.raises(SnapshotLockedError):
        held.check()  # the run whose lock was broken stops before its next request or commit
    again = stopchurn("unlock", "--yes")
    assert again.code == 0 and "is not locked" in again.out


def _other_host_lock(refreshed_ago_s: float, expires_in_s: float, heartbeat_s: float | None = 30.0) -> bytes:
    now = time.time()
    record: dict[str, Any] = {
        "format_version": 1,
        "holder": "nightly.sync run 7 on worker-7",
        "token": uuid.uuid4().hex,
        "host": "worker-7.example",
        "pid": 4242,
        "acquired_at": "2024-01-01T00:00:00+00:00",
        "refreshed_at": datetime.fromtimestamp(now - refreshed_ago_s, UTC).isoformat(),
        "expires_at": now + expires_in_s,
    }
    if heartbeat_s is not None:
        record["heartbeat_s"] = heartbeat_s
    return json.dumps(record).encode()


def test_unlock_refuses_a_fresh_heartbeat_from_another_host_then_forced_says_what_can_happen(
    sb: SandboxServer, where: Where, stopchurn: Callable[..., Result]
) -> None:
    store = where.store()
    _synced(sb, store, runs=1)
    for heartbeat_s in (30.0, None):  # a lock written before the LOCK named its heartbeat: ttl / 3, at most 30 s
        store.backend.write_bytes(
            "LOCK", _other_host_lock(refreshed_ago_s=5, expires_in_s=3595, heartbeat_s=heartbeat_s)
        )
        refused = stopchurn("unlock", "--yes")
        assert refused.code == cli.ERROR, refused
        assert "its heartbeat is fresh" in _one_line_error(refused) and "worker-7.example" in refused.err
        assert store.read_lock() is not None
    assert "on another host, alive: its heartbeat is fresh" in stopchurn("status").out
    forced = stopchurn("unlock", "--yes", "--force")
    assert forced.code == 0 and "Broke the lock" in forced.out
    warning = forced.err
    assert "still alive" in warning and "both runs may send" in warning and "older value" in warning, warning
    assert store.read_lock() is None


def test_unlock_of_another_hosts_lock_whose_heartbeat_stopped_needs_no_force(
    sb: SandboxServer, where: Where, stopchurn: Callable[..., Result]
) -> None:
    store = where.store()
    _synced(sb, store, runs=1)
    # unexpired (a 3 h lease) but not refreshed for an hour although it beats every 30 s: its run is dead
    store.backend.write_bytes("LOCK", _other_host_lock(refreshed_ago_s=3600, expires_in_s=7200))
    assert "on another host, its heartbeat stopped" in stopchurn("status").out
    done = stopchurn("unlock", "--yes")
    assert done.code == 0 and "Broke the lock" in done.out, done
    assert store.read_lock() is None


def test_unlock_of_a_dead_process_needs_no_force(
    sb: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, BRAND, TABLE)
    _synced(sb, store, runs=1)
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from airflow_provider_stopchurn.store import SnapshotStore\n"
        f"SnapshotStore(Path(sys.argv[1]), {BRAND}, {TABLE!r}).table_lock('killed run').acquire()\n"
        "os._exit(0)\n"  # dies holding it
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, timeout=60)
    argv = ["unlock", str(root), "--brand", str(BRAND), "--table", TABLE]
    capsys.readouterr()
    assert cli.main(["status", *argv[1:], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lock"]["state"] == "gone"

    # without --yes and without a terminal: refused, nothing changed
    digest = tree_digest(root)
    assert cli.main(argv) == cli.USAGE
    assert "pass --yes" in capsys.readouterr().err and tree_digest(root) == digest
    # at a terminal, "n" declines and "y" goes on
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    assert cli.main(argv) == cli.ERROR
    assert "declined" in capsys.readouterr().err and tree_digest(root) == digest
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "Broke the lock" in out and "Break this lock? [y/N]" in err and "its process is gone" in err
    assert store.read_lock() is None


# --- settle ----------------------------------------------------------------------------------------------------
def _check_settled_against_sandbox(sb: SandboxServer, store: SnapshotStore, source: pd.DataFrame, chunk: int) -> None:
    """The committed snapshot holds what StopChurn acknowledged as delivered; the rest is marked to send again.

    Rows of acknowledged chunks are committed as delivered (their values are the sandbox's); rows of chunks not
    acknowledged are kept as unsure (a request in flight at the kill may have been applied), so the next run
    sends them again. The sandbox holds the delivered rows, and at most the one chunk in flight besides.
    """
    snapshot = store.read_committed().frame  # type: ignore[union-attr]
    delivered = set(snapshot.filter(snapshot.get_column(HASH_1) != DIRTY_HASH).get_column("id").to_list())
    unsure = set(snapshot.filter(snapshot.get_column(HASH_1) == DIRTY_HASH).get_column("id").to_list())
    held = {row_id for _, row_id in sandbox_rows(sb)}
    assert delivered and delivered <= held <= delivered | unsure
    assert len(held - delivered) <= chunk
    want = expected_rows(source)
    got = sandbox_rows(sb)
    assert all(got[("int", i)] == want[("int", i)] for i in delivered)


def _console(*argv: str, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STOPCHURN), *argv], capture_output=True, text=True, timeout=120, stdin=stdin, env=dict(os.environ)
    )


def test_settle_after_a_killed_run_with_the_console_script(stopchurn_sandbox_factory: Any, tmp_path: Path) -> None:
    rows, chunk = 1200, 40
    sb = stopchurn_sandbox_factory(record=True, faults=FaultConfig(latency=0.01))
    root = tmp_path / "snapshots"
    proc = start_worker(WORKER, sb.url, KEY_VAR, root, 5, rows, chunk, key_var=KEY_VAR, token=sb.token)
    with reaped(proc):  # reaped: a zombie's pid would still look alive
        reached = accepted_or_ended(sb, proc, 7)
        assert reached and proc.poll() is None, "the worker ended or stalled before the kill"
        proc.send_signal(signal.SIGKILL)
    sb.set_faults(FaultConfig())
    table = [str(root), "--brand", str(BRAND), "--table", TABLE]

    before = _console("status", *table, "--json")
    assert before.returncode == 0, before.stderr
    status = json.loads(before.stdout)
    plan = status["pending_plan"]
    assert plan is not None and 6 <= plan["acknowledged_chunks"] < plan["total_chunks"] == rows // chunk
    assert status["committed"] is None
    assert (status["lock"]["holder"], status["lock"]["state"]) == ("crash-worker", "gone")

    digest = tree_digest(root)
    refused = _console("settle", *table)  # no --yes, and stdin is no terminal
    assert refused.returncode == 2 and "pass --yes" in refused.stderr and refused.stdout == ""
    assert tree_digest(root) == digest

    settled = _console("settle", *table, "--yes")
    assert settled.returncode == 0, settled.stderr
    assert f"Settled plan {plan['plan_id']}: {plan['acknowledged_chunks']} of {plan['total_chunks']}" in settled.stdout

    after = json.loads(_console("status", *table, "--json").stdout)
    assert after["pending_plan"] is None and after["lock"] is None
    assert after["committed"]["rows"] == rows  # acknowledged rows delivered, the others kept as unsure
    assert after["last_run"]["kind"] == "settle" and after["last_run"]["settled_chunks"] == plan["acknowledged_chunks"]
    source = deterministic_table(5, rows)
    store = SnapshotStore(root, BRAND, TABLE)
    _check_settled_against_sandbox(sb, store, source, chunk)

    # the next run sends what is not known to be delivered, and the sandbox equals the source
    run_sync(source, store, make_client(sb), options(chunk_size=chunk), run_ms=T0 + 1)
    assert_sandbox_matches(sb, source)
    history = json.loads(_console("history", *table, "--json").stdout)
    assert [r["kind"] for r in history] == ["sync", "settle"]


@pytest.mark.usefixtures("revive")
def test_settle_after_a_dead_run_on_an_object_store(sb: SandboxServer, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"stopchurn-cli/{uuid.uuid4().hex}"
    dying = SnapshotStore(UPath(f"dyingmem://{name}"), BRAND, TABLE)
    source = deterministic_table(9, 400)
    with pytest.raises(Killed):
        run_sync(source, dying, DieAfter(make_client(sb), 4), options(chunk_size=30, max_concurrent_requests=1))
    DyingMemoryFileSystem.dead = False  # a new process, on the store the dead one left
    table = [f"memory://{name}", "--brand", str(BRAND), "--table", TABLE]

    capsys.readouterr()
    assert cli.main(["status", *table, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["pending_plan"]["acknowledged_chunks"] == 4 and status["lock"]["state"] == "alive"
    # the dead run's lock names this process, which lives on: settle waits for it like a run would ...
    assert cli.main(["settle", *table, "--yes"]) == cli.ERROR
    assert "is being synced by another run" in capsys.readouterr().err
    # ... until the person breaks it, knowing better
    assert cli.main(["unlock", *table, "--yes", "--force"]) == 0
    assert "Broke the lock" in capsys.readouterr().out
    assert cli.main(["settle", *table, "--yes", "--json"]) == 0
    settled = json.loads(capsys.readouterr().out)
    assert (settled["acknowledged_chunks"], settled["inserted"], settled["committed"]) == (4, 120, True)

    store = SnapshotStore(UPath(f"memory://{name}"), BRAND, TABLE)
    assert store.pending_plan() is None and store.read_lock() is None
    snapshot = store.read_committed().frame  # type: ignore[union-attr]
    delivered = set(snapshot.filter(snapshot.get_column(HASH_1) != DIRTY_HASH).get_column("id").to_list())
    assert delivered == {row_id for _, row_id in sandbox_rows(sb)}  # exactly what the sandbox holds
    assert cli.main(["settle", *table, "--yes"]) == 0
    assert "nothing to settle" in capsys.readouterr().out
    run_sync(source, store, make_client(sb), options(chunk_size=30), run_ms=T0 + 1)
    assert_sandbox_matches(sb, source)


# --- rebaseline ------------------------------------------------------------------------------------------------
def test_rebaseline_from_parquet(
    sb: SandboxServer, where: Where, stopchurn: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = where.store()
    churn = Churn(43, 200, with_json=False)
    first = tmp_path / "first.parquet"
    churn.frame.to_parquet(first)

    digest = tree_digest(where.root)
    assert stopchurn("rebaseline", "--parquet", str(first), "--key", "id").code == cli.USAGE  # no --yes, no TTY
    monkeypatch.setattr(sys, "stdin", _Terminal("no\n"))
    declined = stopchurn("rebaseline", "--parquet", str(first), "--key", "id")
    assert declined.code == cli.ERROR and "No snapshot is committed yet" in declined.err
    assert tree_digest(where.root) == digest
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    done = stopchurn("rebaseline", "--parquet", str(first), "--key", "id")
    assert done.code == 0, done.err
    assert f"Recorded 200 rows from {first}" in done.out and "nothing was sent" in done.out
    assert update_requests(sb) == 0

    # StopChurn holds the table already (loaded by hand): the next run sends nothing
    summary = run_sync(churn.frame, store, make_client(sb), options(), run_ms=T0)
    assert (summary.requests, summary.unchanged) == (0, 200)

    # a manual reload in the Back Office, then a rebaseline over the committed snapshot
    reloaded = churn.step()
    second = tmp_path / "second.parquet"
    reloaded.to_parquet(second)
    kept = set(churn.frame["id"]) & set(store.read_committed().frame.get_column("id").to_list())  # type: ignore[union-attr]
    created = dict(store.read_committed().columns(["id", CREATED_AT]).iter_rows())  # type: ignore[union-attr]
    result = stopchurn("rebaseline", "--parquet", str(second), "--yes", "--json").json()  # the snapshot's key
    assert result["rows"] == len(reloaded) and result["key_columns"] == ["id"] and result["schema_change"] is None
    committed = store.read_committed()
    assert committed is not None and committed.version == result["version"] != result["previous_version"]
    after = dict(committed.columns(["id", CREATED_AT]).iter_rows())
    assert kept and all(after[i] == created[i] for i in kept)  # known keys keep their createdAt
    summary = run_sync(reloaded, store, make_client(sb), options(), run_ms=T0 + 1)
    assert (summary.requests, summary.unchanged) == (0, len(reloaded))
    assert update_requests(sb) == 0
    # newest first: every run is recorded, the runs that sent nothing included
    assert [r["kind"] for r in store.read_history()] == ["sync", "rebaseline", "sync", "rebaseline"]


def app_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ddl: str, insert: str, rows: list[tuple[Any, ...]]) -> Path:
    """An application's SQLite database holding one table (``ddl``, filled by ``insert`` with ``rows``), which
    Airflow connection ``cli_app_db`` names for the test; returns the database's file."""
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute(ddl)
        conn.executemany(insert, rows)
    monkeypatch.setenv("AIRFLOW_CONN_CLI_APP_DB", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    return db


def test_rebaseline_from_sql_on_sqlite(
    sb: SandboxServer, where: Where, stopchurn: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app_db(
        tmp_path,
        monkeypatch,
        "CREATE TABLE accounts (account_id INTEGER, region TEXT, plan TEXT, seats INTEGER)",
        "INSERT INTO accounts VALUES (?, ?, ?, ?)",
        [(n % 50, ("eu", "us")[n // 50], f"plan-{n % 3}", None if n % 7 == 0 else n) for n in range(100)],
    )
    sql = "SELECT account_id, region, plan, seats FROM accounts"
    keys = ["--key", "region", "--key", "account_id"]
    result = stopchurn("rebaseline", "--sql", sql, "--sql-conn-id", "cli_app_db", *keys, "--yes", "--json").json()
    assert (result["rows"], result["key_columns"]) == (100, ["region", "account_id"])
    assert result["source"] == "SQL on 'cli_app_db'"

    from airflow_provider_stopchurn.operators.stopchurn import read_sql

    store = where.store()
    opts = options(key_columns=("region", "account_id"))
    summary = run_sync(lambda: read_sql("cli_app_db", sql), store, make_client(sb), opts, run_ms=T0)
    assert (summary.requests, summary.unchanged) == (0, 100)

    missing = stopchurn("rebaseline", "--sql", sql, *keys, "--yes")
    assert missing.code == cli.USAGE and "--sql needs --sql-conn-id" in _one_line_error(missing)
    both = stopchurn("rebaseline", "--sql", sql, "--parquet", "x.parquet", "--sql-conn-id", "cli_app_db", "--yes")
    assert both.code == cli.USAGE and "exactly one of" in _one_line_error(both)


def test_rebaseline_parses_json_columns_as_the_operator(
    sb: SandboxServer, where: Where, stopchurn: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebaseline with --json-column records what a sync with json_columns reads: the next run sends nothing."""
    rows = [(1, '{"b": 1, "a": [2]}'), (2, None), (3, "[]")]
    db = app_db(
        tmp_path,
        monkeypatch,
        "CREATE TABLE accounts (id INTEGER, profile TEXT)",
        "INSERT INTO accounts VALUES (?, ?)",
        rows,
    )
    sql = "SELECT id, profile FROM accounts"
    args = ["rebaseline", "--sql", sql, "--sql-conn-id", "cli_app_db", "--json-column", "profile", "--yes", "--json"]
    assert stopchurn(*args).json()["rows"] == 3

    from airflow_provider_stopchurn.operators.stopchurn import read_sql

    with sqlite3.connect(db) as conn:  # the same JSON, written another way
        conn.execute("""UPDATE accounts SET profile = '{"a":[2],"b":1}' WHERE id = 1""")
    opts = options(json_columns=("profile",))
    summary = run_sync(lambda: read_sql("cli_app_db", sql), where.store(), make_client(sb), opts, run_ms=T0)
    assert (summary.requests, summary.unchanged) == (0, 3)


# --- errors and entry points -----------------------------------------------------------------------------------
def test_errors_are_one_line_with_exit_codes(where: Where, stopchurn: Callable[..., Result], capsys: Any) -> None:
    nowhere = stopchurn("status")
    assert nowhere.code == cli.ERROR and "no StopChurn store for brand" in _one_line_error(nowhere)
    assert cli.main(["status", where.uri, "--table", TABLE]) == cli.USAGE  # argparse: --brand is required
    assert "--brand" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == cli.USAGE
    capsys.readouterr()
    assert cli.main(["--help"]) == 0
    assert "rebaseline" in capsys.readouterr().out


def test_conn_id_opens_the_store_through_airflow(sb: SandboxServer, capsys: pytest.CaptureFixture[str]) -> None:
    from airflow.sdk.io import attach

    attach("memory", conn_id="cli_snapshots", fs=fsspec.filesystem("memory"))
    uri = f"memory://stopchurn-cli/{uuid.uuid4().hex}"
    _synced(sb, SnapshotStore(UPath(uri), BRAND, TABLE), runs=1)
    argv = ["status", uri, "--brand", str(BRAND), "--table", TABLE, "--conn-id", "cli_snapshots", "--json"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["committed"]["rows"] == 300
    assert cli.main([*argv[:-2], "no_such_conn"]) == cli.ERROR
    assert capsys.readouterr().err.count("\n") == 1


def test_the_cli_reads_a_store_without_importing_airflow(sb: SandboxServer, tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    _synced(sb, SnapshotStore(root, BRAND, TABLE), runs=2)
    code = (
        "import json, sys\n"
        "from airflow_provider_stopchurn import cli\n"
        "table = [sys.argv[1], '--brand', sys.argv[2], '--table', sys.argv[3], '--json']\n"
        "codes = [cli.main([command, *table]) for command in ('status', 'history', 'rejected')]\n"
        "leaked = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
        "print(json.dumps({'codes': codes, 'leaked': leaked}), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(root), str(BRAND), TABLE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report == {"codes": [0, 0, 0], "leaked": []}


def test_airflow_stopchurn_commands(sb: SandboxServer, tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, BRAND, TABLE)
    _synced(sb, store, runs=1)
    table = [str(root), "--brand", str(BRAND), "--table", TABLE]

    def airflow(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "airflow", "stopchurn", *argv],
            capture_output=True,
            text=True,
            timeout=180,
            env=dict(os.environ),
            stdin=subprocess.DEVNULL,
        )

    status = airflow("status", *table, "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["committed"]["rows"] == 300  # stdout holds the document only
    lock = store.table_lock("held while airflow stopchurn runs")
    lock.acquire()
    try:
        refused = airflow("unlock", *table, "--yes")
        assert refused.returncode == 1 and "still running on this host" in refused.stderr
    finally:
        lock.release()
    assert airflow("history", *table).returncode == 0


def test_cli_commands_in_the_provider_info() -> None:
    from airflow.providers_manager import ProvidersManager

    functions = ProvidersManager().cli_command_functions
    assert cli.airflow_cli_commands in functions
    (group,) = cli.airflow_cli_commands()
    assert group.name == "stopchurn"
    assert sorted(c.name for c in group.subcommands) == sorted(cli.COMMANDS)


def test_console_script_is_installed() -> None:
    proc = _console("--help")
    assert proc.returncode == 0 and "status" in proc.stdout and "rebaseline" in proc.stdout
    assert _console("status").returncode == 2  # usage: URI, --brand and --table are required


def test_timestamps_sort_with_the_file_names(where: Where) -> None:
    store = where.store()
    for n in range(3):
        store.append_history({"n": n})
        time.sleep(0.002)
    assert [r["n"] for r in store.read_history()] == [2, 1, 0]
    assert store.read_history(0) == []


def test_unreadable_lock_is_reported_and_broken(
    sb: SandboxServer, where: Where, stopchurn: Callable[..., Result]
) -> None:
    store = where.store()
    _synced(sb, store, runs=1)
    store.backend.write_bytes("LOCK", b'{"holder": "torn')  # a writer that died mid-write on a store without rename
    lock = stopchurn("status", "--json").json()["lock"]
    assert (lock["state"], lock["holder"], lock["token"]) == ("unreadable", None, None)
    assert "cannot be read" in stopchurn("status").out
    assert stopchurn("unlock", "--yes").code == 0
    assert not store.backend.exists("LOCK")


def test_rebaseline_refuses_bad_source_data_and_changes_nothing(
    sb: SandboxServer, where: Where, stopchurn: Callable[..., Result], tmp_path: Path
) -> None:
    store = where.store()
    churn, _ = _synced(sb, store, runs=1)
    duplicated = pd.concat([churn.frame, churn.frame.head(3)], ignore_index=True)
    source = tmp_path / "duplicated.parquet"
    duplicated.to_parquet(source)
    digest = tree_digest(where.root)
    refused = stopchurn("rebaseline", "--parquet", str(source), "--yes")
    assert refused.code == cli.ERROR and "duplicate" in _one_line_error(refused).lower()
    assert tree_digest(where.root) == digest
