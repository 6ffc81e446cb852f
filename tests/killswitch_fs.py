"""fsspec memory filesystems that die at a chosen write, for in-process kills of stores and export folders.

A killed process takes an in-memory filesystem with it, so the kill is simulated: the write chosen raises
:class:`Killed` (a ``BaseException`` nothing in the engine catches) and from then on every write and delete
raises it too, as a dead process makes none. Reads keep working, so the next "process" sees exactly what the
dying one left once the switch is disarmed. :class:`WriteGuardedFileSystem` is the common part: each
filesystem here, in ``dying_fs`` and in the event state machine decides only when a write kills.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from upath import UPath


class Killed(BaseException):
    """The process died (nothing in the engine catches a BaseException)."""


#: Decides whether a write kills the process: (path, number of this write since arming) -> die before it.
Trigger = Callable[[str, int], bool]


class WriteGuardedFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem that asks :meth:`_before_write` before every write (an open for writing) and
    :meth:`_before_delete` before every delete; either raises :class:`Killed` where the process dies."""

    #: True: paths of this protocol are ``memory://`` paths (the same files), not a store of its own.
    same_files_as_memory: ClassVar[bool] = False

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        prefix = f"{cls.protocol[0]}://"
        if cls.same_files_as_memory and isinstance(path, str) and path.startswith(prefix):
            path = "memory://" + path.removeprefix(prefix)
        return super()._strip_protocol(path)

    def _before_write(self, path: str) -> None:
        """Raise :class:`Killed` if the process dies before writing ``path``."""

    def _before_delete(self) -> None:
        """Raise :class:`Killed` if the process dies before a delete."""

    def _opened(self, handle: Any) -> Any:
        """The handle of a write that went ahead (a subclass may make its close kill the process)."""
        return handle

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            return super()._open(path, mode, **kwargs)
        self._before_write(str(path))
        return self._opened(super()._open(path, mode, **kwargs))

    def rm_file(self, path: str) -> None:
        self._before_delete()
        super().rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._before_delete()
        super().rm(path, recursive=recursive, maxdepth=maxdepth)


class CountingKillFileSystem(WriteGuardedFileSystem):
    """A memory filesystem of its own that counts writes and dies before the one :meth:`_dies_before` names; once
    dead, it refuses every write and delete."""

    writes = 0
    dead = False

    def _dies_before(self, path: str, count: int) -> bool:
        """Whether the process dies before write number ``count`` (to ``path``) since arming."""
        return False

    def _before_delete(self) -> None:
        if type(self).dead:
            raise Killed

    def _before_write(self, path: str) -> None:
        self._before_delete()
        cls = type(self)
        cls.writes += 1
        if self._dies_before(path, cls.writes):
            cls.dead = True
            raise Killed


class KillSwitchFileSystem(CountingKillFileSystem):
    """A memory filesystem of its own with a kill switch (see the module docstring)."""

    protocol = ("killswitch",)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    trigger: Trigger | None = None

    @classmethod
    def arm(cls, trigger: Trigger | None) -> None:
        """Die before the first write for which ``trigger`` says so (None: never); count writes from 0."""
        cls.writes, cls.trigger, cls.dead = 0, trigger, False

    @classmethod
    def die_at(cls, n: int) -> None:
        """Die before the ``n``-th write from now (1-based; 0: never)."""
        cls.arm((lambda _path, count: count == n) if n > 0 else None)

    def _dies_before(self, path: str, count: int) -> bool:
        trigger = type(self).trigger
        return trigger is not None and trigger(path, count)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self._before_delete()
        super().mkdir(path, create_parents=create_parents, **kwargs)


class KillableMemoryFileSystem(CountingKillFileSystem):
    """A memory filesystem of its own, dying at the N-th write (0: never), just before it or just after it
    completes."""

    protocol = ("killmem",)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    crash_at = 0
    when = "before"
    generation = 0

    @classmethod
    def arm(cls, crash_at: int, when: str) -> None:
        cls.writes, cls.crash_at, cls.when, cls.dead = 0, crash_at, when, False
        cls.generation += 1

    def _dies_before(self, path: str, count: int) -> bool:
        return count == self.crash_at and self.when == "before"

    def _opened(self, handle: Any) -> Any:
        cls = type(self)
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


fsspec.register_implementation("killswitch", KillSwitchFileSystem, clobber=True)
fsspec.register_implementation("killmem", KillableMemoryFileSystem, clobber=True)


def quiet_upath(url: str) -> Any:
    """``UPath(url)`` for a protocol of these tests, without UPath's warning that it has no class of its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return UPath(url)


def fresh_root(name: str = "root") -> Any:
    """A new, empty folder on the kill-switch filesystem (disarmed)."""
    KillSwitchFileSystem.arm(None)
    return quiet_upath(f"killswitch://stopchurn/{uuid.uuid4().hex}/{name}")
