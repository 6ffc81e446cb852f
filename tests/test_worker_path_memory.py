"""Peak memory of a worker-path churn run, measured in a fresh child process against the sandbox on 127.0.0.1.

The bound is wide (a multiple of the source's own size) so that it holds on any machine and under any load: it
catches a run that holds whole copies of the table again, not a few megabytes. The child's peak is its VmHWM,
reset once the source is built and the imports are done, so it counts only what the run itself allocates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROWS = 200_000

_CHILD = r"""
import gc, json, sys
from pathlib import Path
import numpy as np
import pandas as pd
from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

url, token, root, rows, step = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]


def table(n):
    rng = np.random.default_rng(7)
    ids = np.arange(n, dtype=np.int64)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon"], dtype=object)
    return pd.DataFrame({
        "id": ids,
        "account_id": rng.integers(0, 10_000, n),
        "score": rng.random(n),
        "name": words[rng.integers(0, 5, n)] + pd.Series(ids).astype(str).to_numpy(dtype=object),
        "status": words[rng.integers(0, 5, n)],
        "signup_at": pd.to_datetime(rng.integers(1_500_000_000, 1_700_000_000, n), unit="s", utc=True),
        "is_vip": rng.random(n) < 0.1,
        "preferences": [{"lang": "en", "n": int(i % 7), "tags": ["a", "b"]} for i in ids],
    })


def run(frame):
    client = StopChurnClient(url, token, timeout=60.0)
    opts = SyncOptions(brand_id=7, table_name="memory", chunk_size=500, max_concurrent_requests=2,
                       max_delete_fraction=1.0, initial_load="baseline" if step == "baseline" else "send")
    try:
        return run_sync(frame, SnapshotStore(Path(root), 7, "memory"), client, opts, run_ms=1_700_000_000_000)
    finally:
        client.close()


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


frame = table(rows)
if step == "baseline":
    run(frame)
    sys.exit(0)
frame.loc[frame["id"] % 100 == 7, "score"] = -1.0  # 1% updated
frame = frame[frame["id"] % 200 != 3].reset_index(drop=True)  # 0.5% deleted
source_bytes = int(frame.memory_usage(deep=True).sum())
gc.collect()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM: the peak from here on is the run's
summary = run(frame)
print(json.dumps({"source_bytes": source_bytes, "peak_above": status("VmHWM") - before,
                  "counts": [summary.updated, summary.deleted]}))
"""


def _child(args: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc/self/clear_refs").exists(),
    reason="needs Linux's VmHWM reset",
)
def test_a_churn_run_peaks_below_four_times_the_source(stopchurn_sandbox: Any, tmp_path: Path) -> None:
    """A churn run over 200k rows (1% updated, 0.5% deleted) peaks below four times the source's own in-memory size
    (pandas, deep) above what the process held before it; it measures about 2.1x. A guard against a run that holds
    several whole copies of the table, not a measure of the last megabytes."""
    common = [stopchurn_sandbox.url, stopchurn_sandbox.token, str(tmp_path / "snapshots"), str(ROWS)]
    _child([*common, "baseline"])
    got = json.loads(_child([*common, "churn"]).strip().splitlines()[-1])
    assert got["counts"] == [ROWS // 100, ROWS // 200]
    ratio = got["peak_above"] / got["source_bytes"]
    assert ratio < 4.0, f"peak {got['peak_above'] / 2**20:.0f} MB above start, {ratio:.2f}x the source"
