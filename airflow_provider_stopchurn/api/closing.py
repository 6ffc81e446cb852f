"""Closing on leaving a ``with`` block: the one context-manager base of the API client and the sandbox server.

Both hold something that must be released however a ``with`` block ends (the client its HTTP session, the
sandbox its socket and serving thread); each says how in its :meth:`~ClosedByWith.close`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

__all__ = ["ClosedByWith"]


class ClosedByWith(ABC):
    """A context manager whose ``with`` block gives the object itself and calls :meth:`close` when it ends."""

    @abstractmethod
    def close(self) -> None:
        """Release what the object holds; calling it again does nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
