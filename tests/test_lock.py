"""The table lock on its own: exclusive acquire (also against a stale lock), owner-checked refresh, heartbeat.

Real storage only: a local folder and fsspec's in-memory file system through ``UPath``; races use real threads
and real processes. Airflow is not imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers_sync import wait_until
from upath import UPath

from airflow_provider_stopchurn.exceptions import SnapshotLockedError
from airflow_provider_stopchurn.store import FORMAT_VERSION, Backend, SnapshotStore, TableLock, backend_for

BRAND, TABLE = 7, "subscription"


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "local":
        return tmp_path / "snapshots"
    return UPath(f"memory://stopchurn-lock-tests/{uuid.uuid4().hex}")


def _store(root: Any) -> SnapshotStore:
    return SnapshotStore(root, BRAND, TABLE)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, timeout=30)
    return int(proc.stdout)


def _stale_record(kind: str) -> bytes:
    """A lock left by a run that is gone: expired (another host), or unexpired but of a dead pid of this host."""
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "holder": f"crashed-{kind}",
        "token": uuid.uuid4().hex,
        "acquired_at": "2024-01-01T00:00:00+00:00",
    }
    if kind == "expired":
        record.update(host="some-other-host", pid=4242, expires_at=time.time() - 5)
    else:
        record.update(host=socket.gethostname(), pid=_dead_pid(), expires_at=time.time() + 3600)
    return json.dumps(record).encode()


def _live_record(holder: str, **fields: Any) -> bytes:
    """A record of a live run of this process (a lock or a claim: they share these fields)."""
    record = {
        "format_version": FORMAT_VERSION,
        "holder": holder,
        "token": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "acquired_at": "2024-01-01T00:00:00+00:00",
        "created": time.time(),
        "expires_at": time.time() + 3600,
        **fields,
    }
    return json.dumps(record).encode()


def _lock_bytes(store: SnapshotStore) -> bytes | None:
    return store.backend.read_bytes("LOCK")


def _claims(store: SnapshotStore) -> list[str]:
    return [n for n in store.backend.list_names() if n.endswith(".claim")]


# --- basics ----------------------------------------------------------------------------------------------------
def test_acquire_refuses_a_live_lock_and_release_removes_only_its_own(root: Any) -> None:
    store = _store(root)
    first = store.table_lock("run-a")
    first.acquire()
    second = store.table_lock("run-b")
    started = time.monotonic()
    with pytest.raises(SnapshotLockedError, match="run-a") as info:
        second.acquire()
    assert time.monotonic() - started < 2.0 and f"{BRAND}/{TABLE}" in str(info.value)
    second.release()  # not its lock: untouched
    assert store.read_lock() is not None and store.read_lock()["token"] == first.token  # type: ignore[index]
    first.release()
    assert store.read_lock() is None and store.backend.list_names() == []
    second.acquire()
    assert store.read_lock()["holder"] == "run-b"  # type: ignore[index]
    second.release()


@pytest.mark.parametrize("kind", ["expired", "dead-pid"])
def test_a_stale_lock_is_broken(root: Any, kind: str) -> None:
    store = _store(root)
    store.backend.write_bytes("LOCK", _stale_record(kind))
    lock = store.table_lock("next-run")
    lock.acquire()
    assert store.read_lock()["token"] == lock.token  # type: ignore[index]
    assert _claims(store) == []  # the claim used to break it is gone
    lock.release()
    assert store.backend.list_names() == []


def test_a_torn_lock_is_broken_only_after_a_grace_period(root: Any) -> None:
    store = _store(root)
    store.backend.write_bytes("LOCK", b'{"holder": "half-writ')
    lock = store.table_lock("next-run")
    started = time.monotonic()
    lock.acquire()
    assert time.monotonic() - started >= 0.4  # a writer mid-write had time to finish
    assert store.read_lock()["token"] == lock.token  # type: ignore[index]
    lock.release()


def test_default_heartbeat_interval() -> None:
    backend = backend_for(Path("unused"))
    assert TableLock(backend, "h", ttl_s=3600).interval_s == 30.0
    assert TableLock(backend, "h", ttl_s=6).interval_s == 2.0
    assert TableLock(backend, "h", ttl_s=6, heartbeat_s=0.5).interval_s == 0.5


# --- exactly one wins ------------------------------------------------------------------------------------------
def _race(store: SnapshotStore, contenders: int) -> tuple[list[TableLock], list[int]]:
    """``contenders`` threads try to acquire at the same instant; nobody releases before everyone tried."""
    locks = [store.table_lock(f"thread-{i}") for i in range(contenders)]
    start = threading.Barrier(contenders)
    tried = threading.Barrier(contenders)
    won: list[int] = []
    errors: list[BaseException] = []

    def contend(i: int) -> None:
        start.wait(timeout=30)
        try:
            locks[i].acquire()
            won.append(i)
        except SnapshotLockedError:
            pass
        except BaseException as err:  # reported below
            errors.append(err)
        tried.wait(timeout=30)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    return locks, won


@pytest.mark.parametrize("stale", [None, "expired", "dead-pid"])
def test_threads_racing_for_the_lock_exactly_one_wins(tmp_path: Path, stale: str | None) -> None:
    for round_ in range(4):
        store = _store(tmp_path / f"round-{round_}")
        if stale is not None:
            store.backend.write_bytes("LOCK", _stale_record(stale))
        locks, won = _race(store, 12)
        assert len(won) == 1, won
        assert store.read_lock()["token"] == locks[won[0]].token  # type: ignore[index]
        assert _claims(store) == []
        locks[won[0]].release()
        assert store.read_lock() is None


_WORKER = """
import sys, time
from pathlib import Path
from airflow_provider_stopchurn.exceptions import SnapshotLockedError
from airflow_provider_stopchurn.store import SnapshotStore

folder, name = Path(sys.argv[1]), sys.argv[2]
lock = SnapshotStore(folder / "root", 7, "subscription").table_lock(name, ttl_s=120)
(folder / f"{name}.ready").write_text("")
deadline = time.monotonic() + 60
while not (folder / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.001)
try:
    lock.acquire()
    result = "won"
except SnapshotLockedError:
    result = "lost"
(folder / f"{name}.result").write_text(result)
while not (folder / "done").exists() and time.monotonic() < deadline:
    time.sleep(0.01)
if result == "won":
    lock.release()
"""


def _wait_for_files(paths: list[Path], timeout_s: float) -> bool:
    return wait_until(lambda: all(p.exists() for p in paths), timeout_s, step_s=0.02)


@pytest.mark.parametrize("stale", [None, "dead-pid"])
def test_processes_racing_for_the_lock_exactly_one_wins(tmp_path: Path, stale: str | None) -> None:
    store = SnapshotStore(tmp_path / "root", BRAND, TABLE)
    if stale is not None:
        store.backend.write_bytes("LOCK", _stale_record(stale))
    names = [f"proc-{i}" for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), name]) for name in names]
    try:
        assert _wait_for_files([tmp_path / f"{n}.ready" for n in names], 60)
        (tmp_path / "go").write_text("")
        assert _wait_for_files([tmp_path / f"{n}.result" for n in names], 60)
        results = {n: (tmp_path / f"{n}.result").read_text() for n in names}
        winners = [n for n, r in results.items() if r == "won"]
        assert len(winners) == 1, results
        assert store.read_lock()["holder"] == winners[0]  # type: ignore[index]
    finally:
        (tmp_path / "done").write_text("")
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    assert all(p.returncode == 0 for p in procs)
    assert store.read_lock() is None


class _StaleView:
    """A backend whose first read of LOCK returns what a slow run saw earlier; everything else is real."""

    def __init__(self, backend: Backend, seen: bytes) -> None:
        self._backend = backend
        self._seen: bytes | None = seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def read_bytes(self, name: str) -> bytes | None:
        if name == "LOCK" and self._seen is not None:
            seen, self._seen = self._seen, None
            return seen
        return self._backend.read_bytes(name)


def test_a_run_that_saw_the_stale_lock_late_does_not_break_the_new_one(root: Any) -> None:
    store = _store(root)
    stale = _stale_record("expired")
    store.backend.write_bytes("LOCK", stale)
    winner = store.table_lock("winner")
    winner.acquire()  # broke the stale lock and took it
    # a second run read the stale lock before the winner broke it, and only now acts on what it saw
    late = TableLock(_StaleView(store.backend, stale), "late", label=f"{BRAND}/{TABLE}")  # type: ignore[arg-type]
    with pytest.raises(SnapshotLockedError, match="winner"):
        late.acquire()
    assert store.read_lock()["token"] == winner.token  # type: ignore[index]
    winner.check()
    winner.release()


def test_a_claim_of_a_live_run_is_respected_and_an_abandoned_one_removed(root: Any) -> None:
    store = _store(root)
    stale = _stale_record("expired")
    store.backend.write_bytes("LOCK", stale)
    # another run (of this very process: alive) is breaking that same stale lock right now
    name = f"LOCK.{hashlib.sha256(stale).hexdigest()[:24]}.claim"
    store.backend.write_bytes(name, _live_record("breaker"))
    with pytest.raises(SnapshotLockedError, match="could not take the lock"):
        store.table_lock("patient").acquire()
    assert _lock_bytes(store) == stale  # nothing broken behind the claim's back
    # the same claim, left by a process that is gone
    store.backend.write_bytes(name, _live_record("breaker", pid=_dead_pid()))
    lock = store.table_lock("next")
    lock.acquire()
    assert store.read_lock()["token"] == lock.token  # type: ignore[index]
    assert _claims(store) == []
    lock.release()


# --- owner-checked refresh -------------------------------------------------------------------------------------
def _take_over(store: SnapshotStore, victim: TableLock) -> TableLock:
    """Another run takes the lock once the victim's lease expired."""
    assert wait_until(lambda: (store.read_lock() or {}).get("expires_at", 0) < time.time(), 10)
    thief = store.table_lock("thief", ttl_s=60)
    thief.acquire()
    assert store.read_lock()["token"] == thief.token != victim.token  # type: ignore[index]
    return thief


def test_refresh_of_a_lock_taken_over_raises_and_writes_nothing(root: Any) -> None:
    store = _store(root)
    victim = store.table_lock("victim", ttl_s=0.2)
    victim.acquire()
    thief = _take_over(store, victim)
    taken = _lock_bytes(store)
    with pytest.raises(SnapshotLockedError, match=r"lost its lock to 'thief'.*stops without committing"):
        victim.refresh(force=True)
    assert _lock_bytes(store) == taken
    with pytest.raises(SnapshotLockedError, match="lost its lock"):
        victim.check()
    with pytest.raises(SnapshotLockedError):
        victim.refresh()  # remembered: no later refresh succeeds
    assert victim.lost is not None
    victim.release()
    assert _lock_bytes(store) == taken  # release never deletes someone else's lock
    thief.check()
    thief.release()
    assert store.read_lock() is None


def test_refresh_is_rate_limited_unless_forced(root: Any) -> None:
    store = _store(root)
    lock = store.table_lock("run", ttl_s=60)  # interval 20 s
    lock.acquire()
    before = _lock_bytes(store)
    lock.refresh()
    assert _lock_bytes(store) == before
    time.sleep(0.01)
    lock.refresh(force=True)
    after = store.read_lock()
    assert after is not None and after["token"] == lock.token
    assert after["expires_at"] > json.loads(before or b"{}")["expires_at"]
    assert after["acquired_at"] == json.loads(before or b"{}")["acquired_at"]
    lock.release()


def test_check_renews_an_expired_lease_nobody_took(root: Any) -> None:
    store = _store(root)
    lock = store.table_lock("paused-run", ttl_s=0.2)
    lock.acquire()
    time.sleep(0.3)  # a pause longer than the lease; no other run came
    lock.check()
    record = store.read_lock()
    assert record is not None and record["token"] == lock.token and record["expires_at"] > time.time()
    lock.release()


def test_check_may_trust_a_recent_confirmation(root: Any) -> None:
    store = _store(root)
    lock = store.table_lock("run", ttl_s=60)
    lock.acquire()
    store.backend.write_bytes("LOCK", _stale_record("expired"))  # someone meddles behind the lease's back
    lock.check(max_age_s=10)  # confirmed a moment ago by acquire: no read
    with pytest.raises(SnapshotLockedError):
        lock.check()


def test_commit_refuses_when_the_lock_was_taken_over(root: Any) -> None:
    import polars as pl

    store = _store(root)
    victim = store.table_lock("victim", ttl_s=0.2)
    victim.acquire()
    version = store.write_snapshot(pl.DataFrame({"id": [1]}))
    thief = _take_over(store, victim)
    with pytest.raises(SnapshotLockedError):
        store.commit(
            version, base_version=None, kinds={"id": "int"}, key_columns=["id"], rows=1, plan_id=None, lock=victim
        )
    assert store.read_committed() is None
    thief.release()


# --- heartbeat -------------------------------------------------------------------------------------------------
def _heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stopchurn-lock-heartbeat")]


def test_heartbeat_keeps_a_short_lease_alive_across_a_long_pause(root: Any) -> None:
    store = _store(root)
    lock = store.table_lock("slow-run", ttl_s=0.8, heartbeat_s=0.05)
    lock.acquire()
    with lock.heartbeat():
        assert lock.heartbeat_running
        time.sleep(2.5)  # three leases without any refresh from the "engine"
        with pytest.raises(SnapshotLockedError, match="slow-run"):
            store.table_lock("other").acquire()
        lock.check()
    assert not lock.heartbeat_running and _heartbeat_threads() == []
    frozen = _lock_bytes(store)
    time.sleep(0.2)
    assert _lock_bytes(store) == frozen  # nothing refreshes it any more
    lock.release()
    assert store.read_lock() is None


def test_heartbeat_interval_defaults_to_a_third_of_the_lease(root: Any) -> None:
    store = _store(root)
    lock = store.table_lock("run", ttl_s=0.45)  # interval 0.15 s
    lock.acquire()
    first = store.read_lock()
    assert first is not None and lock.interval_s == 0.15
    with lock.heartbeat():
        assert wait_until(lambda: (store.read_lock() or {}).get("refreshed_at") != first["refreshed_at"], 10)
    lock.release()


def test_heartbeat_records_a_lost_lock_and_check_raises(root: Any) -> None:
    store = _store(root)
    lock = store.table_lock("victim", ttl_s=60, heartbeat_s=0.05)
    lock.acquire()
    usurper = _live_record("usurper")
    with lock.heartbeat():
        # another run took the lock over (written directly: as if this run's lease had lapsed)
        store.backend.write_bytes("LOCK", usurper)
        assert wait_until(lambda: lock.lost is not None, 10)
        assert wait_until(lambda: not lock.heartbeat_running, 10)  # it stopped by itself
        with pytest.raises(SnapshotLockedError, match="lost its lock to 'usurper'"):
            lock.check()
    assert _lock_bytes(store) == usurper
    lock.release()
    assert _lock_bytes(store) == usurper


def test_heartbeat_stops_when_the_block_raises(root: Any) -> None:
    store = _store(root)
    lock = store.table_lock("run", ttl_s=60, heartbeat_s=0.05)
    lock.acquire()
    with pytest.raises(RuntimeError, match="boom"), lock.heartbeat():
        raise RuntimeError("boom")
    assert not lock.heartbeat_running and _heartbeat_threads() == []
    with pytest.raises(RuntimeError, match="already running"), lock.heartbeat(), lock.heartbeat():
        pass
    assert _heartbeat_threads() == []
    lock.release()


def test_store_lock_context_releases_and_composes_with_heartbeat(root: Any) -> None:
    store = _store(root)
    seen: Callable[[], dict[str, Any] | None] = store.read_lock
    with store.lock("ctx-run", ttl_s=0.3, heartbeat_s=0.05) as lock, lock.heartbeat():
        time.sleep(0.5)
        assert (seen() or {}).get("token") == lock.token
    assert seen() is None and _heartbeat_threads() == []


# --- fencing: the check before every request -------------------------------------------------------------------
def test_fence_trusts_a_confirmation_only_while_it_covers_the_request(root: Any) -> None:
    store = _store(root)
    lock = store.table_lock("run", ttl_s=3.0, heartbeat_s=2.0)  # margin 0.3 s
    lock.acquire()
    usurper = _live_record("usurper")
    store.backend.write_bytes("LOCK", usurper)  # the lease moved behind this run's back
    lock.fence(request_s=1.0)  # confirmed a moment ago: the lease covers 1.0 s + margin, no read
    time.sleep(1.5)
    # 1.5 s old + a 1.5 s request + margin reaches past the lease: read again, and the lease is gone. (A trust
    # of one heartbeat interval, 2 s, would have let this request out.)
    with pytest.raises(SnapshotLockedError, match="lost its lock to 'usurper'; it sends nothing more"):
        lock.fence(request_s=1.5)
    with pytest.raises(SnapshotLockedError):
        lock.fence()  # remembered
    assert _lock_bytes(store) == usurper


def test_fence_renews_a_lease_too_short_for_the_next_request(root: Any) -> None:
    store = _store(root)
    lock = store.table_lock("run", ttl_s=3.0, heartbeat_s=60)
    lock.acquire()
    first = store.read_lock()
    time.sleep(1.0)
    lock.fence(request_s=2.0)  # 2 s left < 2 s + margin: refreshed before the request may go
    renewed = store.read_lock()
    assert first is not None and renewed is not None and renewed["token"] == lock.token
    assert renewed["expires_at"] > first["expires_at"]
    lock.release()


def test_fence_refuses_a_lease_shorter_than_a_request(root: Any) -> None:
    from airflow_provider_stopchurn.exceptions import StopChurnConfigError

    store = _store(root)
    lock = store.table_lock("run", ttl_s=10.0)
    lock.acquire()
    with pytest.raises(StopChurnConfigError, match=r"lock_ttl_s=10 is too short .* 40 s"):
        lock.fence(request_s=40.0)
    lock.release()


def test_no_message_or_doc_advises_deleting_the_snapshot_folder() -> None:
    """Deleting a table's folder makes the next run a first load that resends the whole table: never advised."""
    import re

    advice = re.compile(
        r"(?i)\b(?:or|then|and|just|please)\s+(?:delete|remove|wipe|clear)\s+(?:the\s+)?(?:table's\s+)?"
        r"(?:snapshot\s+)?(?:folder|directory|store)\b|(?:delete|remove)\s+the\s+(?:table's\s+)?snapshot\s+folder"
        r"\s+to\s+start"
    )
    project = Path(__file__).resolve().parents[1]
    files = [
        *sorted((project / "airflow_provider_stopchurn").rglob("*.py")),
        project / "README.md",
        *sorted((project / "docs").glob("*.md")),
    ]
    found = [
        f"{path.relative_to(project)}: {match.group(0)!r}"
        for path in files
        for match in advice.finditer(re.sub(r'"\s*\n\s*f?"', "", path.read_text()))  # joined string literals
    ]
    assert found == []
