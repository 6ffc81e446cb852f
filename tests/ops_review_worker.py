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
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
from helpers_sync import BRAND, T0

from airflow_provider_stopchurn.client import StopChurnClient
from airflow_provider_stopchurn.events import EventOptions, event_store, run_events
from airflow_provider_stopchurn.export import ExportOptions, run_export
from airflow_provider_stopchurn.snapshot import SnapshotStore

STREAM = "deposits"
EXPORT_TABLE = "accounts"


def event_options(holder: str, **kwargs: Any) -> EventOptions:
    """The stream's options: events keyed by ``id``, read incrementally by ``at`` (epoch ms), no lookback."""
    return EventOptions(
        brand_id=BRAND,
        user_id_column="user_id",
        name="DEPOSIT",
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
    client = StopChurnClient(url, os.environ[key_var], max_retries=0, timeout=5.0, connect_timeout=2.0)
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
    try:
        summary = _events(*args) if mode == "events" else _export(*args)
    except Exception as err:
        print(json.dumps({"error": type(err).__name__, "message": str(err)}), flush=True)
        return 1
    print(json.dumps(summary.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
