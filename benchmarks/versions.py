"""The DataFrame churn run of two checkouts of this project side by side, with the naive peer, in one run.

Usage::

    python benchmarks/versions.py --old /path/to/checkout-of-0.1.0 [--old /path/to/another] [--new .] [--rows 1000000]

Each repetition runs, one after another and each in a fresh child process: each older checkout's churn run (in
the order given), the new checkout's churn run, and the naive pandas peer (``frames.naive_sync``), so the
machine's other load weighs on all of them alike. Every child builds the same seeded table and churn
(``synthetic.make_data``), commits the base table as a baseline with its own engine (each version reads only its
own store format), then times one churn run against the same sandbox. A last child per checkout runs the churn
under cProfile and reports the cumulative seconds of the engine's steps, so a regression can be placed. Only the
checkouts' packages differ: the interpreter, the libraries and the data are the same.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _engine(pkg_root: Path) -> tuple[Any, Any, Any, Any]:
    """``run_sync``, ``SnapshotStore``, ``StopChurnClient`` and ``SyncOptions`` of the checkout at ``pkg_root``
    (0.1.0 kept them in flat modules; later versions in sub-packages)."""
    sys.path.insert(0, str(pkg_root))
    try:
        from airflow_provider_stopchurn.api.client import StopChurnClient
        from airflow_provider_stopchurn.options import SyncOptions
        from airflow_provider_stopchurn.store import SnapshotStore
        from airflow_provider_stopchurn.update.sync import run_sync
    except ImportError:
        from airflow_provider_stopchurn.client import StopChurnClient  # type: ignore[no-redef]
        from airflow_provider_stopchurn.snapshot import SnapshotStore  # type: ignore[no-redef]
        from airflow_provider_stopchurn.sync import SyncOptions, run_sync  # type: ignore[no-redef]
    import airflow_provider_stopchurn

    if not str(Path(airflow_provider_stopchurn.__file__).resolve()).startswith(str(pkg_root.resolve())):
        raise RuntimeError(f"imported {airflow_provider_stopchurn.__file__}, not the checkout at {pkg_root}")
    return run_sync, SnapshotStore, StopChurnClient, SyncOptions


def _child(args: argparse.Namespace) -> int:
    """One measurement in this fresh process; prints one JSON line."""
    if args.kind != "naive":
        # before anything imports the package, so the checkout's own package is the one loaded
        run_sync, store_cls, client_cls, options_cls = _engine(Path(args.pkg))
    from harness import BRAND_ID, RUN_MS, TABLE, TOKEN
    from synthetic import make_data

    base, new, churn = make_data(args.rows)
    work = Path(args.work)
    if args.kind == "naive":
        from frames import naive_sync

        prev = work / "naive-prev.parquet"
        base.to_parquet(prev)
        del base
        t0 = time.perf_counter()
        got = naive_sync(new, prev, work / "naive-next.parquet", args.url, 500)
        print(json.dumps({"seconds": time.perf_counter() - t0, "changes": [got.updated, got.inserted, got.deleted]}))
        return 0
    root = work / f"root-{args.kind}"
    shutil.rmtree(root, ignore_errors=True)

    def run(frame: Any, **extra: Any) -> Any:
        client = client_cls(args.url, TOKEN)
        opts = options_cls(
            brand_id=BRAND_ID,
            table_name=TABLE,
            chunk_size=500,
            max_concurrent_requests=4,
            max_delete_fraction=1.0,
            **extra,
        )
        try:
            return run_sync(frame, store_cls(root, BRAND_ID, TABLE), client, opts, run_ms=RUN_MS)
        finally:
            client.close()

    run(base, initial_load="baseline")
    del base
    if args.profile:
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        summary = run(new)
        prof.disable()
        seconds = time.perf_counter() - t0
        stats = pstats.Stats(prof)
        steps: dict[str, float] = {}
        for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            if "airflow_provider_stopchurn" in filename:
                name = filename.split("airflow_provider_stopchurn/")[-1] + ":" + func
                steps[name] = max(steps.get(name, 0.0), ct)
        top = dict(sorted(steps.items(), key=lambda kv: -kv[1])[: args.top])
        print(json.dumps({"seconds": seconds, "steps": top}))
        return 0
    t0 = time.perf_counter()
    summary = run(new)
    seconds = time.perf_counter() - t0
    if (summary.updated, summary.inserted, summary.deleted) != (churn.updated, churn.inserted, churn.deleted):
        raise RuntimeError(f"wrong counts: {summary}")
    print(json.dumps({"seconds": seconds, "changes": [summary.updated, summary.inserted, summary.deleted]}))
    return 0


def _spawn(kind: str, pkg: Path, args: argparse.Namespace, url: str, work: Path, *, profile: bool = False) -> Any:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--pkg", str(pkg), "--rows", str(args.rows)]
    cmd += ["--url", url, "--work", str(work), "--top", str(args.top)] + (["--profile"] if profile else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=HERE)
    if out.returncode:
        raise RuntimeError(f"child {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", action="append", help="checkout of an older version (repeatable)")
    parser.add_argument("--new", default=str(HERE.parent), help="checkout of the newer version (default: this one)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25, help="steps listed per profile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pkg", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.kind = args.child
        return _child(args)
    if not args.old:
        parser.error("--old is required")
    sys.path.insert(0, str(HERE))
    from harness import Sandbox

    versions = {f"old{i + 1}" if len(args.old) > 1 else "old": Path(p).resolve() for i, p in enumerate(args.old)}
    versions["new"] = Path(args.new).resolve()
    kinds = [*versions, "naive"]
    sandbox = Sandbox()
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        with tempfile.TemporaryDirectory(prefix="sc-versions-") as tmp:
            work = Path(tmp)
            for rep in range(args.reps):
                for kind in kinds:
                    sandbox.reset()
                    got = _spawn(kind, versions.get(kind, versions["new"]), args, sandbox.url, work)
                    times[kind].append(got["seconds"])
                    print(f"rep {rep + 1} {kind}: {got['seconds']:.2f} s", flush=True)
            profiles: dict[str, Any] = {}
            for kind, checkout in versions.items():
                sandbox.reset()
                profiles[kind] = _spawn(kind, checkout, args, sandbox.url, work, profile=True)
    finally:
        sandbox.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.rows:,} rows, median of {args.reps} (each run in a fresh child process, interleaved):")
    for kind in kinds:
        where = f"  ({versions[kind]})" if kind in versions else ""
        print(f"  {kind:5s} {med[kind]:6.2f} s  [{', '.join(f'{t:.2f}' for t in times[kind])}]{where}")
    for kind in versions:
        print(f"  naive / {kind} churn run: {med['naive'] / med[kind]:.2f}x faster")
    for kind in versions:
        print(f"\ncProfile of one {kind} churn run ({profiles[kind]['seconds']:.2f} s), cumulative s per function:")
        for name, sec in profiles[kind]["steps"].items():
            print(f"  {sec:6.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
