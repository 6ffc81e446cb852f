"""Run one sync of a deterministic table in its own process, so that a test can kill it mid-delivery.

Usage: ``python crash_worker.py <sandbox url> <api key env var> <snapshot root> <seed> <rows> <chunk size>
[<run key> <try number>]``: with the last two, the sync is one try of a DAG run (``run_key``, ``run_info``).
The API key is read from the named environment variable (never from argv, which ``ps`` shows). Prints
``started`` once the source is built, then the summary as JSON when the sync finishes.
"""

from __future__ import annotations

from pathlib import Path

from helpers_sync import BRAND, T0, TABLE, deterministic_table, options
from worker_harness import client_from_env, print_line, serve

from airflow_provider_stopchurn.options import RunInfo
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync


def main(argv: list[str]) -> int:
    url, key_var, root, seed, rows, chunk_size = argv[:6]
    run: dict[str, object] = {}
    if len(argv) == 8:  # one try of a DAG run
        run = {"run_key": argv[6], "run_info": RunInfo("dag", "task", argv[6], int(argv[7]))}
    frame = deterministic_table(int(seed), int(rows))
    store = SnapshotStore(Path(root), BRAND, TABLE)
    client = client_from_env(url, key_var, max_retries=0, timeout=30.0)
    print_line("started")
    summary = run_sync(
        frame,
        store,
        client,
        options(chunk_size=int(chunk_size), max_concurrent_requests=1, holder="crash-worker", **run),
        run_ms=T0,
    )
    print_line(summary.as_dict())
    return 0


if __name__ == "__main__":
    serve(main)
