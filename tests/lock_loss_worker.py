"""Sync a one-row table in its own process, so that a test can pause it (SIGSTOP) while its client waits to retry.

Usage: ``python lock_loss_worker.py <sandbox url> <api key env var> <snapshot root> <name value> <lock ttl s>``.
The API key is read from the named environment variable (never from argv, which ``ps`` shows). Prints the summary
as JSON when the sync finishes, or ``{"error": <class>, "message": <text>}`` and exits 1 when it fails.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from helpers_sync import BRAND, T0, TABLE, options
from worker_harness import client_from_env, serve, summary_or_error

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync


def main(argv: list[str]) -> int:
    url, key_var, root, value, ttl = argv
    frame = pl.DataFrame({"id": [1], "name": [value]})
    # a short request timeout, so that a lease of a few seconds can fence it
    client = client_from_env(url, key_var, max_retries=3, timeout=1.0, connect_timeout=0.5, backoff_base=0.01)
    opts = options(max_concurrent_requests=1, holder="paused-run", lock_ttl_s=float(ttl), lock_wait_s=0)
    return summary_or_error(lambda: run_sync(frame, SnapshotStore(Path(root), BRAND, TABLE), client, opts, run_ms=T0))


if __name__ == "__main__":
    serve(main)
