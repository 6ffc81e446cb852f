"""A run of the event or export engine in its own process, so that a test can pause it (SIGSTOP) at a chosen point.

Usage:

* ``python ops_review_worker.py events <sandbox url> <api key env var> <state root> <rows parquet>``: sends the
  events of the rows file (read when the run has its lock) after waiting up to 120 s for the stream's lock.
* ``python ops_review_worker.py export <state root> <output root> <run id> <run key> <go file> <lock ttl s>``:
  exports ten rows; its source writes ``<go file>.reading`` and waits (at most 120 s) for ``<go file>`` to exist.

The API key is read from the named environment variable (never from argv, which ``ps`` shows). Prints the summary
as JSON when the run finishes, or ``{"error": <class>, "message": <text>}`` and exits 1 when it fails.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
from helpers_events import deposit_options
from helpers_sync import BRAND, T0
from worker_harness import client_from_env, serve, summary_or_error

from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import event_store
from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.export.engine import run_export
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.store import SnapshotStore

STREAM = "deposits"
EXPORT_TABLE = "accounts"


def event_options(holder: str, **kwargs: Any) -> EventOptions:
    """The stream's options: events keyed by ``id``, read incrementally by ``at`` (epoch ms), no lookback."""
    return deposit_options(
        BRAND,
        value_column=None,
        event_key=("id",),
        watermark_column="at",
        lookback=dt.timedelta(0),
        max_concurrent_requests=1,
        holder=holder,
        **kwargs,
    )


def export_frame() -> pl.DataFrame:
    return pl.DataFrame({"id": list(range(1, 11)), "email": [f"user{i}@example.com" for i in range(1, 11)]})


def _events(url: str, key_var: str, root: str, rows: str) -> Any:
    client = client_from_env(url, key_var, max_retries=0, timeout=5.0, connect_timeout=2.0)
    store = event_store(Path(root), BRAND, STREAM)
    opts = event_options("waiting-run", lock_wait_s=120.0)
    return run_events(lambda window: pl.read_parquet(rows), store, client, opts, stream=STREAM)


def _export(root: str, output: str, run_id: str, run_key: str, go: str, ttl: str) -> Any:
    def source() -> pl.DataFrame:
        Path(go + ".reading").write_text("reading")
        deadline = time.monotonic() + 120
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return export_frame()

    opts = ExportOptions(
        brand_id=BRAND,
        table_name=EXPORT_TABLE,
        run_id=run_id,
        run_key=run_key,
        holder="zombie-try",
        lock_ttl_s=float(ttl),
        lock_wait_s=0,
    )
    store = SnapshotStore(Path(root), BRAND, EXPORT_TABLE)
    return run_export(source, store, Path(output), opts, run_ms=T0)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    mode, *args = argv
    return summary_or_error(lambda: _events(*args) if mode == "events" else _export(*args))


if __name__ == "__main__":
    serve(main)
