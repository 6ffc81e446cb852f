"""Run one event delivery in its own process, so that a test can kill it mid-delivery.

Usage: ``python events_crash_worker.py <sandbox url> <api key env var> <state root> <rows> <chunk size>``. The API
key is read from the named environment variable (never from argv, which ``ps`` shows). Prints ``started`` once
the source is built, then the summary as JSON when the delivery finishes.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
from helpers_events import deposit_options
from worker_harness import client_from_env, print_line, serve

from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import event_store
from airflow_provider_stopchurn.events.options import EventOptions

BRAND = 5
STREAM = "crash.deposits"


def source(rows: int) -> pd.DataFrame:
    ids = np.arange(rows, dtype=np.int64)
    return pd.DataFrame(
        {
            "deposit_id": ids,
            "user_id": ids % 97,
            "amount": ids * 3,
            "created_at": pd.Timestamp("2025-01-01", tz="UTC") + pd.to_timedelta(ids, unit="s"),
        }
    )


def options(chunk_size: int) -> EventOptions:
    return deposit_options(
        BRAND,
        watermark_column="created_at",
        lookback=dt.timedelta(hours=1),
        chunk_size=chunk_size,
        max_concurrent_requests=1,
        holder="events-crash-worker",
    )


def main(argv: list[str]) -> int:
    url, key_var, root, rows, chunk_size = argv
    frame = source(int(rows))
    client = client_from_env(url, key_var, max_retries=0, timeout=30.0)
    print_line("started")
    summary = run_events(frame, event_store(Path(root), BRAND, STREAM), client, options(int(chunk_size)))
    print_line(summary.as_dict())
    return 0


if __name__ == "__main__":
    serve(main)
