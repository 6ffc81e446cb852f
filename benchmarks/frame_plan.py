"""CPU seconds of the DataFrame churn run's diff step: reading the committed snapshot and ``make_plan``.

Usage::

    python benchmarks/frame_plan.py --rows 1000000 --reps 7

The benchmark's table and churn (``synthetic.make_data``) are canonicalized once; the base table is committed as a
baseline (untimed); then each repetition reads the committed snapshot and plans the churn, timed by the process's
CPU seconds (all threads), which the machine's other work distorts less than seconds. Run it from two checkouts
(``git archive`` of the older commit unpacked beside this one, its package first on ``PYTHONPATH``), alternated,
to compare two versions of the diff step on one machine.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import shutil
import tempfile
import time
from pathlib import Path

from frames import commit_baseline
from harness import BRAND_ID, RUN_MS, TABLE, Sandbox, fresh_dir, options
from synthetic import make_data

from airflow_provider_stopchurn.source.canonical import canonicalize_source
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.plan import make_plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    base, new, churn = make_data(args.rows)
    tmp = Path(tempfile.mkdtemp(prefix="stopchurn-frame-plan-"))
    sandbox = Sandbox()
    try:
        root = commit_baseline(base, fresh_dir(tmp, "baseline"), sandbox.url)
        del base
        store = SnapshotStore(root, BRAND_ID, TABLE)
        opts = options(500, 4)
        canon = canonicalize_source(new, key_columns=opts.key_columns)
        # the whole path keeps the keys the file's check read, where this version can
        keep = "keep_keys" in inspect.signature(store.read_committed).parameters
        cpu: list[float] = []
        for _ in range(args.reps):
            gc.collect()
            start = time.process_time()
            committed = store.read_committed(keep_keys=True) if keep else store.read_committed()
            plan = make_plan(canon, committed, opts, RUN_MS)
            cpu.append(time.process_time() - start)
            if (plan.inserted, plan.updated, plan.deleted) != (churn.inserted, churn.updated, churn.deleted):
                raise RuntimeError(f"planned {plan.inserted}/{plan.updated}/{plan.deleted}, expected {churn}")
            del plan, committed
        cpu.sort()
        print(
            f"read the committed snapshot + make_plan, {args.rows:,} rows: CPU s min {cpu[0]:.3f}, median "
            f"{cpu[len(cpu) // 2]:.3f} ({args.reps} reps; load average {os.getloadavg()[0]:.1f})"
        )
    finally:
        sandbox.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
