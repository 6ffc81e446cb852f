"""An fsspec memory filesystem that dies at a chosen write, for in-process kills of stores and export folders.

A killed process takes an in-memory filesystem with it, so the kill is simulated: the write chosen by
:meth:`KillSwitchFileSystem.arm` raises :class:`Killed` (a ``BaseException`` nothing in the engine catches) and
from then on every write and delete raises it too, as a dead process makes none. Reads keep working, so the
next "process" sees exactly what the dying one left once the switch is disarmed.
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
    """The process died."""


#: Decides whether a write kills the process: (path, number of this write since arming) -> die before it.
Trigger = Callable[[str, int], bool]


class KillSwitchFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem with a kill switch (see the module docstring)."""

    protocol = ("killswitch",)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    writes = 0
    trigger: Trigger | None = None
    dead = False

    @classmethod
    def arm(cls, trigger: Trigger | None) -> None:
        """Die before the first write for which ``trigger`` says so (None: never); count writes from 0."""
        cls.writes, cls.trigger, cls.dead = 0, trigger, False

    @classmethod
    def die_at(cls, n: int) -> None:
        """Die before the ``n``-th write from now (1-based; 0: never)."""
        cls.arm((lambda _path, count: count == n) if n > 0 else None)

    def _check(self) -> None:
        if type(self).dead:
            raise Killed

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            return super()._open(path, mode, **kwargs)
        self._check()
        cls = type(self)
        cls.writes += 1
        if cls.trigger is not None and cls.trigger(str(path), cls.writes):
            cls.dead = True
            raise Killed
        return super()._open(path, mode, **kwargs)

    def rm_file(self, path: str) -> None:
        self._check()
        super().rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._check()
        super().rm(path, recursive=recursive, maxdepth=maxdepth)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self._check()
        super().mkdir(path, create_parents=create_parents, **kwargs)


fsspec.register_implementation("killswitch", KillSwitchFileSystem, clobber=True)


def fresh_root(name: str = "root") -> Any:
    """A new, empty folder on the kill-switch filesystem (disarmed)."""
    KillSwitchFileSystem.arm(None)
    with warnings.catch_warnings():  # UPath warns once that it has no class of its own for this protocol
        warnings.simplefilter("ignore", UserWarning)
        return UPath(f"killswitch://stopchurn/{uuid.uuid4().hex}/{name}")
