"""The crash matrix on an object store: the run dies at every write of the store, then a clean run converges.

A killed process takes an in-memory object store with it, so this matrix runs in-process on a real fsspec
memory filesystem with a kill switch: at the N-th write (just before it, or just after it completes) the
filesystem raises :class:`Killed`, a ``BaseException`` nothing in the engine catches, and from then on refuses
every write and delete, as a dead process would make none. The store is left exactly as the dying run left
it. The lock that run held would belong to a process that is gone (broken at once on its host, see
tests/test_lock.py); here it is broken by hand, then a clean run must make the sandbox equal to the source.
"""

from __future__ import annotations

import uuid
import warnings
from typing import Any, ClassVar

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options
from recovery_scenarios import SCENARIOS, first_table, moved_on
from upath import UPath

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync


class Killed(BaseException):
    """The process died."""


class KillableMemoryFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem, dying at the N-th write (0: never), counting writes meanwhile."""

    protocol = ("killmem",)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    writes = 0
    crash_at = 0
    when = "before"
    dead = False
    generation = 0

    @classmethod
    def arm(cls, crash_at: int, when: str) -> None:
        cls.writes, cls.crash_at, cls.when, cls.dead = 0, crash_at, when, False
        cls.generation += 1

    def _check(self) -> None:
        if type(self).dead:
            raise Killed

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            return super()._open(path, mode, **kwargs)
        self._check()
        cls = type(self)
        cls.writes += 1
        if cls.writes == cls.crash_at and cls.when == "before":
            cls.dead = True
            raise Killed
        handle = super()._open(path, mode, **kwargs)
        if cls.writes == cls.crash_at and cls.when == "after":
            close = handle.close
            armed = cls.generation

            def close_then_die() -> None:
                close()
                if cls.generation == armed and not cls.dead:  # once, in this run only
                    cls.dead = True
                    raise Killed

            handle.close = close_then_die
        return handle

    def rm_file(self, path: str) -> None:
        self._check()
        super().rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._check()
        super().rm(path, recursive=recursive, maxdepth=maxdepth)


fsspec.register_implementation("killmem", KillableMemoryFileSystem, clobber=True)


def _fresh(sb: Any, scenario: str) -> SnapshotStore:
    KillableMemoryFileSystem.arm(0, "never")
    sb.reset()
    with warnings.catch_warnings():  # UPath warns once that it has no class of its own for this protocol
        warnings.simplefilter("ignore", UserWarning)
        root = UPath(f"killmem://stopchurn/{uuid.uuid4().hex}")
    store = SnapshotStore(root, BRAND, TABLE)
    run_sync(first_table(), store, make_client(sb), options(chunk_size=8), run_ms=T0)
    sb.reject_ids(SCENARIOS[scenario].rejected)
    return store


def _second_run(sb: Any, store: SnapshotStore, scenario: str) -> None:
    target, opts = SCENARIOS[scenario].second()
    try:
        run_sync(target, store, make_client(sb), opts, run_ms=T0 + 1000)
    except Exception:  # the scenario's own failure (a 400 under "fail"); a Killed is not an Exception
        return


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_object_store_killed_at_every_write_then_a_clean_run_converges(
    stopchurn_sandbox_factory: Any, scenario: str
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    store = _fresh(sb, scenario)
    KillableMemoryFileSystem.arm(0, "never")
    _second_run(sb, store, scenario)
    writes = KillableMemoryFileSystem.writes
    assert writes >= 5
    for n in range(1, writes + 1):
        for when in ("before", "after"):
            store = _fresh(sb, scenario)
            KillableMemoryFileSystem.arm(n, when)
            with pytest.raises(Killed):
                _second_run(sb, store, scenario)
            KillableMemoryFileSystem.arm(0, "never")  # a new process on a live store
            store.break_lock()  # the dead run's process is gone: its lock would be broken at once
            sb.reject_ids(())
            target = moved_on()  # the source moved on: what the dead run may have applied must be undone
            run_sync(target, store, make_client(sb), options(chunk_size=8), run_ms=T0 + 2000)
            assert_sandbox_matches(sb, target)
            assert store.pending_plan() is None, (n, when)
            again = run_sync(target, store, make_client(sb), options(chunk_size=8), run_ms=T0 + 3000)
            assert again.inserted + again.updated + again.deleted == 0, (n, when)
