"""Hold a table's lock (with its heartbeat) until stdin closes, in a process a test starts in a PID namespace of its
own: a worker in another container on the same host name, whose pid means nothing here.

Usage: ``python pid_namespace_holder.py <snapshot root>``. Prints ``{"pid": <its pid>, "token": <its lease>}`` once
it holds the lock.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from helpers_sync import BRAND, TABLE

from airflow_provider_stopchurn.store import SnapshotStore


def main(root: str) -> int:
    store = SnapshotStore(Path(root), BRAND, TABLE)
    with store.lock("container-run", ttl_s=30.0) as lock, lock.heartbeat(1.0):
        print(json.dumps({"pid": os.getpid(), "token": lock.token}), flush=True)
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
