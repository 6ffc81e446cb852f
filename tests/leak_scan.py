"""What the secret-leak tests scan after a run: every log record (every logger at DEBUG), what the process printed
and the files it wrote. The ``captured`` fixture is registered for every test module in ``conftest.py``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Captured:
    """The test's log records and output, for a scan for a secret."""

    caplog: pytest.LogCaptureFixture
    capfd: pytest.CaptureFixture[str]

    def start(self) -> None:
        """Capture every logger at DEBUG from now on."""
        self.caplog.set_level(logging.DEBUG)

    def records(self) -> str:
        """Every captured record: its message, its arguments and its traceback, one record a line."""
        return "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in self.caplog.records)

    def printed(self) -> Any:
        """What the process wrote to stdout and stderr since the last call (``.out``, ``.err``)."""
        return self.capfd.readouterr()


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Captured:
    """The test's log records and output (see :class:`Captured`)."""
    return Captured(caplog, capfd)


def files_text(root: Path) -> str:
    """The text of every file under ``root`` (undecodable bytes replaced)."""
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())
