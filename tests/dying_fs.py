"""A store whose process dies: fsspec's memory filesystem that refuses every write once ``dead``, and a sender that
kills it after ``n`` chunks. What the dead run left stays readable at ``memory://`` for the next "process".
"""

from __future__ import annotations

from typing import Any, ClassVar

import fsspec
from killswitch_fs import Killed, WriteGuardedFileSystem
from upath.implementations.memory import MemoryPath
from upath.registry import register_implementation


class DyingMemoryFileSystem(WriteGuardedFileSystem):
    """fsspec's memory filesystem (the same files as ``memory://``) that refuses every write once ``dead``."""

    protocol = ("dyingmem",)
    same_files_as_memory = True
    dead: ClassVar[bool] = False

    def _before_delete(self) -> None:
        if type(self).dead:
            raise Killed

    def _before_write(self, path: str) -> None:
        self._before_delete()


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
