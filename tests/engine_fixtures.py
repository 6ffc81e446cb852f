"""Fixtures the engine tests share: a sandbox that records what it received, and a dying filesystem revived after
the test (registered for every test module in ``conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from dying_fs import DyingMemoryFileSystem

from airflow_provider_stopchurn.sandbox import SandboxServer


@pytest.fixture
def sb(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> SandboxServer:
    """A started sandbox of the test's own that records every row and event it receives."""
    return stopchurn_sandbox_factory(record=True)


@pytest.fixture
def revive() -> Iterator[None]:
    """After the test, ``dyingmem://`` writes work again: the next test's process is alive."""
    yield
    DyingMemoryFileSystem.dead = False
