"""What the hypothesis state machines share: their settings, the sandbox and store each example starts from, and
a source that churns from a seed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import ClassVar

import pandas as pd
from helpers_sync import BRAND, TABLE, Churn
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize

from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.sandbox.pytest_plugin import SANDBOX_TEST_TOKEN
from airflow_provider_stopchurn.store import SnapshotStore

#: ``STOPCHURN_SOAK=long`` runs the machines with more examples and longer runs (see tests/test_soak.py).
LONG = os.environ.get("STOPCHURN_SOAK") == "long"


def machine_settings(examples: int, steps: int, *, long_examples: int = 0, long_steps: int = 0) -> settings:
    """Settings for a state machine's ``TestCase``: no deadline (a sandbox round trip has none), slow examples
    allowed, the soak profile's counts where given and ``STOPCHURN_SOAK=long``.

    :param examples: how many examples the default profile runs (keep it to about a minute).
    :param steps: how many steps an example takes in the default profile.
    :param long_examples: examples under ``STOPCHURN_SOAK=long`` (0: as many as the default profile).
    :param long_steps: steps under ``STOPCHURN_SOAK=long`` (0: as many as the default profile).
    """
    return settings(
        max_examples=long_examples if LONG and long_examples else examples,
        stateful_step_count=long_steps if LONG and long_steps else steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def sandbox_and_store() -> tuple[SandboxServer, tempfile.TemporaryDirectory[str], SnapshotStore]:
    """A started sandbox that records nothing, a temporary folder and a store of the test table in it: what an
    example starts from. The caller stops the sandbox and cleans the folder up."""
    sb = SandboxServer(token=SANDBOX_TEST_TOKEN, record=False).start()
    tmp = tempfile.TemporaryDirectory()
    return sb, tmp, SnapshotStore(Path(tmp.name), BRAND, TABLE)


class ChurningSourceMachine(RuleBasedStateMachine):
    """A state machine whose source starts as :attr:`source_rows` rows of a :class:`Churn` seeded by hypothesis;
    its rules change the source with ``self.churn.step(...)``."""

    #: How many rows the first source holds.
    source_rows: ClassVar[int] = 30
    churn: Churn
    source: pd.DataFrame

    @initialize(seed=st.integers(0, 10_000))
    def start(self, seed: int) -> None:
        self.churn = Churn(seed, self.source_rows)
        self.source = self.churn.frame.copy()
