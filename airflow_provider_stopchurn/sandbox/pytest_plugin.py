"""Pytest fixtures for the StopChurn sandbox.

Enable them in a ``conftest.py``::

    pytest_plugins = ["airflow_provider_stopchurn.sandbox.pytest_plugin"]

then ask for ``stopchurn_sandbox`` (a started server with token ``"sandbox-test-key"``) or
``stopchurn_sandbox_factory`` (a function that starts servers with any :class:`SandboxServer` arguments).
Every server a fixture started is stopped when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from airflow_provider_stopchurn.sandbox.server import SandboxServer

#: The token of the servers the fixtures start, unless told otherwise.
SANDBOX_TEST_TOKEN = "sandbox-test-key"  # noqa: S105 - a test key, not a secret


@pytest.fixture
def stopchurn_sandbox() -> Iterator[SandboxServer]:
    """A started sandbox on 127.0.0.1 (free port) accepting the token ``"sandbox-test-key"``."""
    with SandboxServer(token=SANDBOX_TEST_TOKEN) as sandbox:
        yield sandbox


@pytest.fixture
def stopchurn_sandbox_factory() -> Iterator[Callable[..., SandboxServer]]:
    """A function ``make(**kwargs) -> SandboxServer`` returning started servers, all stopped at teardown.

    The keyword arguments are those of :class:`SandboxServer`; ``token`` defaults to ``"sandbox-test-key"``.
    """
    started: list[SandboxServer] = []

    def make(**kwargs: Any) -> SandboxServer:
        kwargs.setdefault("token", SANDBOX_TEST_TOKEN)
        sandbox = SandboxServer(**kwargs)
        started.append(sandbox)
        return sandbox.start()

    yield make
    for sandbox in reversed(started):
        sandbox.stop()
