"""Run one sync in its own process and die (``os._exit``) at the N-th durable write of the snapshot store.

Usage: ``python crash_at_write_worker.py <sandbox url> <api key env var> <snapshot root> <scenario> <N> <when>``.
Every durable write of the local store ends in ``os.replace`` (a file is written aside, then renamed into place);
the worker wraps that standard-library call, counts it, and exits hard just ``before`` or ``after`` the N-th one,
as a SIGKILL would. N = 0 never crashes and prints the number of writes of a whole run. The API key comes from
the named environment variable. The scenario's source comes from ``recovery_scenarios.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers_sync import BRAND, T0, TABLE
from recovery_scenarios import SCENARIOS
from worker_harness import client_from_env, print_line, serve

from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync


def main(argv: list[str]) -> int:
    url, key_var, root, scenario, crash_at, when = argv
    target, opts = SCENARIOS[scenario].second()
    store = SnapshotStore(Path(root), BRAND, TABLE)
    client = client_from_env(url, key_var, max_retries=0, timeout=30.0)
    real_replace = os.replace
    count = 0
    limit = int(crash_at)

    def replace(src: str, dst: str) -> None:
        nonlocal count
        count += 1
        if count == limit and when == "before":
            os._exit(9)
        real_replace(src, dst)
        if count == limit and when == "after":
            os._exit(9)

    os.replace = replace  # type: ignore[assignment]
    try:
        run_sync(target, store, client, opts, run_ms=T0 + 1000)
    except StopChurnError as err:
        print_line(f"failed: {type(err).__name__}")
    print_line(f"writes {count}")
    return 0


if __name__ == "__main__":
    serve(main)
