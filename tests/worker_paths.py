"""Run a test module on both worker paths: the whole one, and the streamed one forced on for every source.

``from worker_paths import worker_path`` and ``pytestmark = pytest.mark.usefixtures("worker_path")`` run each test of
a module twice; the environment variable reaches the worker processes the crash matrices start.
"""

from __future__ import annotations

import pytest

from airflow_provider_stopchurn.update.stream import STREAM_ENV


@pytest.fixture(params=["whole", "streamed"])
def worker_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``whole``: every source read whole; ``streamed``: every source (pandas too) planned by the streamed path."""
    monkeypatch.setenv(STREAM_ENV, "never" if request.param == "whole" else "always")
    return str(request.param)


def streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the streamed path on for the rest of a test (a state machine run under it)."""
    monkeypatch.setenv(STREAM_ENV, "always")
