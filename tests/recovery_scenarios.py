"""The scenarios of the crash matrix: a committed first table, then a second run that changes it.

Each scenario gives the first table, the second table with the options of the second run, and the ids the
sandbox rejects during the second run. Shared by the test and its worker process, so both build the same tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from helpers_sync import options

from airflow_provider_stopchurn.options import SyncOptions

ROWS = 60


def first_table() -> pd.DataFrame:
    ids = np.arange(1, ROWS + 1)
    return pd.DataFrame({"id": ids, "v": [f"v{i}" for i in ids], "qty": ids * 2})


def churned() -> pd.DataFrame:
    frame = first_table()
    frame = frame[frame["id"] % 10 != 0].copy()  # 6 deletes
    frame.loc[frame["id"] % 3 == 0, "qty"] = -5  # updates
    added = pd.DataFrame({"id": np.arange(100, 110), "v": ["new"] * 10, "qty": np.arange(10)})
    return pd.concat([frame, added], ignore_index=True)


def moved_on() -> pd.DataFrame:
    """The source of the clean run after a crash: back to the first table (the new rows gone), some rows changed."""
    frame = first_table()
    frame.loc[frame["id"] % 4 == 0, "v"] = "moved"
    return frame


@dataclass(frozen=True)
class Scenario:
    second: Callable[[], tuple[pd.DataFrame, SyncOptions]]
    rejected: tuple[int, ...] = ()
    #: ids the sandbox fails with 500 on every try, recorded as failing on earlier tries (suspect) before the run
    failing: tuple[int, ...] = ()


SCENARIOS = {
    # every chunk accepted: target committed as it is; encoded in windows of 20 updates (chunk ranges recorded
    # window by window)
    "plain": Scenario(lambda: (churned(), options(chunk_size=8, max_concurrent_requests=1, window_rows=20))),
    # rows rejected in two chunks: bisection, rejections recorded with the acks, a settled snapshot written
    "quarantine": Scenario(
        lambda: (churned(), options(chunk_size=8, max_concurrent_requests=1, on_rejected_rows="quarantine")),
        rejected=(3, 104),
    ),
    # a 400 under "fail" in the middle: the acknowledged chunks are settled, then the run fails
    "settle": Scenario(
        lambda: (churned(), options(chunk_size=8, max_concurrent_requests=1)),
        rejected=(27,),
    ),
    # rows failing with 500 on every try, suspect from earlier runs: their chunks taken apart, the rows held,
    # the per-row failure counts and the quarantine staged, beside a rejection bisected
    "isolation": Scenario(
        lambda: (churned(), options(chunk_size=8, max_concurrent_requests=2, on_rejected_rows="quarantine")),
        rejected=(104,),
        failing=(3, 27),
    ),
}
