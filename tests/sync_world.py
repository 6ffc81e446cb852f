"""The sandbox "world" the update-path tests share: a sandbox, one snapshot store and a clock, so that each test
runs the public engine (``run_sync``) again and again, one second apart, and checks what StopChurn holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from helpers_sync import BRAND, T0, TABLE, make_client, options

from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import SyncSummary, run_sync

N = 40


def table(n: int = N, **overrides: Any) -> pd.DataFrame:
    """``n`` rows keyed by ``id`` (``v`` a string, ``qty`` an int); ``overrides`` replace whole columns."""
    ids = np.arange(1, n + 1)
    frame = pd.DataFrame({"id": ids, "v": [f"v{i}" for i in ids], "qty": ids * 3})
    for column, values in overrides.items():
        frame[column] = values
    return frame


class SyncWorld:
    """A sandbox and the store of ``BRAND``/``TABLE`` under ``root``; each :meth:`run` is a second later.

    :param sb: the sandbox the runs deliver to.
    :param root: the snapshot root.
    """

    #: the client's arguments when a run gets no sender of its own
    client_kwargs: ClassVar[dict[str, Any]] = {}
    #: options every run of this world has unless it says otherwise
    defaults: ClassVar[dict[str, Any]] = {"chunk_size": 5, "max_concurrent_requests": 1}

    def __init__(self, sb: SandboxServer, root: Path) -> None:
        self.sb = sb
        self.root = root
        self.store = SnapshotStore(root, BRAND, TABLE)
        self.tick = 0

    def run(self, frame: Any, *, sender: Any = None, **opts: Any) -> SyncSummary:
        """One run of ``run_sync`` of ``frame``.

        :param frame: the source.
        :param sender: the sender (default: a client of the sandbox).
        :param opts: the run's options over :attr:`defaults`.
        """
        self.tick += 1
        return run_sync(
            frame,
            self.store,
            sender or make_client(self.sb, **self.client_kwargs),
            options(**{**self.defaults, **opts}),
            run_ms=T0 + 1000 * self.tick,
        )


class QuarantiningWorld(SyncWorld):
    """Rejected rows are quarantined, and the client retries once: the world of the adversarial update cases."""

    client_kwargs: ClassVar[dict[str, Any]] = {"max_retries": 1}
    defaults: ClassVar[dict[str, Any]] = {**SyncWorld.defaults, "on_rejected_rows": "quarantine"}
