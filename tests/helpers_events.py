"""The event stream most event tests send: deposits, one ``DEPOSIT`` event per ``deposit_id`` for its ``user_id``,
valued by ``amount``; deposit rows for the DAG-level tests; and the options of a run that records its history."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd

from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.options import RunInfo

DEPOSITS: dict[str, Any] = {
    "user_id_column": "user_id",
    "name": "DEPOSIT",
    "value_column": "amount",
    "event_key": ("deposit_id",),
}


def deposit_options(brand_id: int, **kwargs: Any) -> EventOptions:
    """The deposits stream's options for ``brand_id``; ``kwargs`` add options or replace those of :data:`DEPOSITS`.

    :param brand_id: the brand the events go to.
    :param kwargs: more :class:`EventOptions` fields.
    """
    return EventOptions(brand_id=brand_id, **{**DEPOSITS, **kwargs})


def hourly_deposits(first: int, last: int, start: dt.datetime) -> pd.DataFrame:
    """Deposits ``first..last`` (inclusive), deposit i made at ``start`` + i hours by user ``u{i % 4}``.

    :param first: the first deposit id.
    :param last: the last deposit id.
    :param start: when deposit 0 was made.
    """
    ids = list(range(first, last + 1))
    return pd.DataFrame(
        {
            "deposit_id": ids,
            "user_id": [f"u{i % 4}" for i in ids],
            "amount": [i * 100 for i in ids],
            "created_at": [start + dt.timedelta(hours=i) for i in ids],
        }
    )


def recorded_run_options(brand_id: int, try_number: int, **kwargs: Any) -> EventOptions:
    """The options of a deposits run (no value) that records its history as try ``try_number`` of DAG run ``r1``
    of task ``dag.events``: watermark ``created_at``, a lookback of two hours, chunks of 4.

    :param brand_id: the brand the events go to.
    :param try_number: the task's try the history records.
    :param kwargs: more :class:`EventOptions` fields.
    """
    return EventOptions(
        brand_id=brand_id,
        user_id_column="user_id",
        name="DEPOSIT",
        event_key=("deposit_id",),
        watermark_column="created_at",
        lookback=dt.timedelta(hours=2),
        chunk_size=4,
        run_key="dag.events run r1 map -1",
        run_info=RunInfo("dag", "events", "r1", try_number),
        **kwargs,
    )
