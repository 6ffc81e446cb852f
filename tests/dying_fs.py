"""A store whose process dies: fsspec's memory filesystem that refuses every write once ``dead``, and a sender that
kills it after ``n`` chunks. What the dead run left stays readable at ``memory://`` for the next "process".
"""

from __future__ import annotations

from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from upath.implementations.memory import MemoryPath
from upath.registry import register_implementation


class Killed(BaseException):
    """The process died (nothing in the engine catches a BaseException)."""


class DyingMemoryFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem (the same files as ``memory://``) that refuses every write once ``dead``."""

    protocol = ("dyingmem",)
    dead: ClassVar[bool] = False

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith("dyingmem://"):
            path = "memory://" + path.removeprefix("dyingmem://")
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" not in mode and type(self).dead:
            raise Killed
        return super()._open(path, mode, **kwargs)

    def rm_file(self, path: str) -> None:
        if type(self).dead:
            raise Killed
        super().rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        if type(self).dead:
            raise Killed
        super().rm(path, recursive=recursive, maxdepth=maxdepth)


fsspec.register_implementation("dyingmem", DyingMemoryFileSystem, clobber=True)
# paths of it behave as memory:// paths (UPath would otherwise warn once per process, at whichever test comes first)
register_implementation("dyingmem", MemoryPath, clobber=True)


class DieAfter:
    """A sender that delivers ``n`` chunks, then the process dies: no more writes, the next request never sent."""

    def __init__(self, client: Any, n: int) -> None:
        self.client, self.n, self.sent = client, n, 0

    def post_update_body(self, body: bytes) -> Any:
        if self.sent == self.n:
            DyingMemoryFileSystem.dead = True
            raise Killed
        self.sent += 1
        return self.client.post_update_body(body)
