"""The harness every benchmark family shares: the sandbox process, timings, peak memory and step phases, the
PostgreSQL starter and Airflow environment, the profile and the report's small helpers."""

from __future__ import annotations

import contextlib
import cProfile
import gc
import importlib.metadata
import os
import platform
import pstats
import resource
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import polars as pl
import psutil
import pyarrow as pa
import requests
from results_file import write_report
from synthetic import Churn

from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.store import SnapshotStore

RUN_MS = 1_700_000_000_000
BRAND_ID = 1
TABLE = "bench"
TOKEN = "bench-token"  # the local sandbox's key, not a secret
HERE = Path(__file__).resolve().parent
GB = 1024**3
MB = 1024**2


# ---------------------------------------------------------------------------------------------------------------
# sandbox (separate process)
# ---------------------------------------------------------------------------------------------------------------
class Sandbox:
    """``python -m airflow_provider_stopchurn.sandbox`` on a free port of 127.0.0.1, in its own process."""

    def __init__(self, latency: float = 0.0) -> None:
        cmd = [sys.executable, "-m", "airflow_provider_stopchurn.sandbox", "--port", "0", "--token", TOKEN]
        if latency:
            cmd += ["--latency", str(latency)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], 30)
            line = self.proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
            if "listening on" not in line:
                raise RuntimeError(f"the sandbox did not start (said {line!r})")
            self.url = line.rsplit(" ", 1)[-1].strip()
            self.ps = psutil.Process(self.proc.pid)
        except BaseException:
            self.stop()
            raise

    def reset(self) -> None:
        requests.post(self.url + "/_sandbox/reset", timeout=120).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return requests.get(self.url + "/_sandbox/stats", timeout=30).json()

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---------------------------------------------------------------------------------------------------------------
# the engine options every scenario starts from
# ---------------------------------------------------------------------------------------------------------------
def options(chunk_size: int, concurrency: int) -> SyncOptions:
    return SyncOptions(
        brand_id=BRAND_ID,
        table_name=TABLE,
        chunk_size=chunk_size,
        max_concurrent_requests=concurrency,
        max_delete_fraction=1.0,
    )


PG_CONN_ID = "stopchurn_bench_pg"
PG_CONN_ENV = f"AIRFLOW_CONN_{PG_CONN_ID.upper()}"


def pg_server_module() -> Any:
    """``tests/pg_server.py``: the test suite's PostgreSQL starter (one code path for both)."""
    tests_dir = str(HERE.parent / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import pg_server

    return pg_server


class PostgresCpu:
    """CPU seconds of the PostgreSQL server: the postmaster, its live children and those it has reaped (each
    connection's backend)."""

    def __init__(self, server: Any) -> None:
        with server.connect() as conn:  # the backend ends with its connection: its parent is found while it lives
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            parent = psutil.Process(backend).parent()
        if parent is None:
            raise RuntimeError("cannot find the PostgreSQL postmaster")
        self.ps = parent

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in self.ps.children():
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total


def airflow_environment(tmp: Path, server: Any | None) -> None:
    """A throwaway AIRFLOW_HOME (set before anything imports Airflow) and, with a server, the Airflow connection
    the operator's SQL path reads (``AIRFLOW_CONN_<ID>``); child processes inherit both."""
    home = tmp / "airflow-home"
    home.mkdir(exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home / 'airflow.db'}"
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    if server is not None:
        os.environ[PG_CONN_ENV] = server.airflow_connection_json()


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    sandbox_cpu: list[float] = field(default_factory=list)
    own_cpu: list[float] = field(default_factory=list)
    db_cpu: list[float] = field(default_factory=list)
    children: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def sandbox_median(self) -> float:
        return statistics.median(self.sandbox_cpu) if self.sandbox_cpu else float("nan")

    @property
    def own_median(self) -> float:
        return statistics.median(self.own_cpu)

    @property
    def db_median(self) -> float:
        return statistics.median(self.db_cpu) if self.db_cpu else float("nan")

    @property
    def median_child(self) -> dict[str, Any]:
        """The repetition whose seconds are the median (the lower middle one for an even count)."""
        return sorted(self.children, key=lambda c: c["seconds"])[(len(self.children) - 1) // 2]

    @property
    def peak_child(self) -> dict[str, Any]:
        """The repetition with the highest peak RSS above its start."""
        return max(self.children, key=lambda c: c["peak_during_run"] - c["rss_before_run"])

    @property
    def peak_above_start(self) -> int:
        """The highest peak RSS above the RSS before the run, over the repetitions (fresh child processes)."""
        return max(c["peak_during_run"] - c["rss_before_run"] for c in self.children)

    def cell(self) -> str:
        spread = f" ({min(self.seconds):.2f}-{max(self.seconds):.2f})" if len(self.seconds) > 1 else ""
        return f"{self.median:.2f}{spread}"


def measure(
    label: str,
    fn: Callable[[], Any],
    reps: int,
    sandbox: Sandbox | None = None,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    timing = Timing()
    for rep in range(reps):
        if setup is not None:
            setup()
        gc.collect()
        cpu0 = sandbox.cpu() if sandbox else 0.0
        own0 = own_cpu_seconds()
        t0 = time.perf_counter()
        timing.result = fn()
        elapsed = time.perf_counter() - t0
        timing.own_cpu.append(own_cpu_seconds() - own0)
        if sandbox:
            timing.sandbox_cpu.append(sandbox.cpu() - cpu0)
        timing.seconds.append(elapsed)
        print(f"  {label}: rep {rep + 1}/{reps}: {elapsed:.2f} s", flush=True)
    return timing


def own_cpu_seconds() -> float:
    """CPU seconds of this process, all threads."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


def fresh_dir(parent: Path, name: str) -> Path:
    path = parent / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def copy_root(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def check_counts(what: str, got: Any, want: Churn) -> None:
    have = (got.inserted, got.updated, got.deleted)
    if have != (want.inserted, want.updated, want.deleted):
        raise RuntimeError(f"{what}: inserted/updated/deleted = {have}, expected {want}")


# ---------------------------------------------------------------------------------------------------------------
# peak RSS of one engine run (child processes) and its steps
# ---------------------------------------------------------------------------------------------------------------
def vm_hwm_bytes() -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


class Phases:
    """Seconds and peak RSS of the top-level steps of one run, measured inside the (child) process that runs it.

    :meth:`wrap` replaces an engine function by one that times its top-level calls (one row per call, in the
    order they ran). VmHWM is read and reset at every step boundary, so each step's peak is its own and the run's
    peak is the highest of all segments (the steps and the gaps between them). Costs microseconds per step."""

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []  # [label, seconds, peak RSS (absolute), size of what the step returned]
        self.gap_peak = 0
        self.depth = 0
        self.read_s = 0.0

    def _segment(self) -> int:
        peak = vm_hwm_bytes() or 0
        reset_hwm()
        return peak

    @contextlib.contextmanager
    def step(self, label: str) -> Any:
        if self.depth:  # nested: counted in the enclosing step
            yield []
            return
        self.gap_peak = max(self.gap_peak, self._segment())
        self.depth += 1
        row: list[Any] = [label, 0.0, 0, None]
        t0 = time.perf_counter()
        try:
            yield row
        finally:
            self.depth -= 1
            row[1] = time.perf_counter() - t0
            row[2] = self._segment()
            self.rows.append(row)

    def wrap(self, owner: Any, name: str, label: str, size: Callable[[Any], int] | None = None) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.step(label) as row:
                result = original(*args, **kwargs)
                if size is not None and row:
                    row[3] = size(result)
                return result

        setattr(owner, name, timed)

    def timed_batches(self, batches: Any) -> Any:
        """The source's batches, the time spent producing them (the database read) added to ``read_s``."""
        with contextlib.closing(timed_items(batches, self._add_read)) as timed:
            yield from timed

    def _add_read(self, seconds: float) -> None:
        self.read_s += seconds

    def peak(self) -> int:
        return max(self.gap_peak, self._segment(), *(int(row[2]) for row in self.rows))

    def table(self, start: int) -> list[list[Any]]:
        """``[label, seconds, peak RSS above start, bytes of the frame the step returned or None]`` per step."""
        return [[label, seconds, int(peak) - start, size] for label, seconds, peak, size in self.rows]


def timed_items(items: Any, add_seconds: Callable[[float], None]) -> Iterator[Any]:
    """``items`` passed through, the time spent producing each (a database's share of a read) to ``add_seconds``;
    closing this closes ``items``."""
    it = iter(items)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                add_seconds(time.perf_counter() - t0)
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def measured(run: Callable[[], Any], phases: Phases) -> tuple[Any, dict[str, Any]]:
    """Run ``run`` in this process: its seconds, CPU seconds, RSS before it and peak RSS (VmHWM reset first)."""
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    hwm_reset = reset_hwm()
    cpu0 = own_cpu_seconds()
    t0 = time.perf_counter()
    got = run()
    elapsed = time.perf_counter() - t0
    cpu = own_cpu_seconds() - cpu0
    peak = phases.peak() if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return got, {
        "seconds": elapsed,
        "cpu": cpu,
        "rss_before_run": rss_before,
        "peak_during_run": peak,
        "peak_source": "VmHWM, reset before the run" if hwm_reset else "ru_maxrss (process lifetime)",
        "phases": phases.table(rss_before),
    }


def enough_memory(rows: int, need: int) -> bool:
    """Whether ``need`` bytes are free for a run of ``rows`` rows; if not, say so on stderr."""
    free = psutil.virtual_memory().available
    if need > free:
        print(
            f"refusing: {rows:,} rows need about {need / GB:.1f} GiB of memory, {free / GB:.1f} GiB available",
            file=sys.stderr,
        )
        return False
    return True


def publish(text: str, out: str) -> None:
    """Print a report and write it to ``out`` (``-``: print only), keeping the dated sections the file held."""
    print()
    print(text)
    if out != "-":
        write_report(Path(out), text)
        print(f"(written to {Path(out).name})")


def engine_phases() -> Phases:
    """Time and measure the engine's steps in this process (a child run's)."""
    from airflow_provider_stopchurn.update import stream, sync

    phases = Phases()
    phases.wrap(
        sync,
        "canonicalize_source",
        "read + canonicalize the source",
        lambda canon: int(canon.frame.estimated_size()),
    )
    phases.wrap(
        sync,
        "make_plan",
        "diff (make_plan; reads the committed snapshot)",
        lambda plan: int(plan.target.estimated_size()),
    )
    phases.wrap(SnapshotStore, "write_snapshot", "write the new snapshot")
    # the streamed path (sources of record batches): its own steps, the whole path's above left unused
    phases.wrap(stream, "_spool_source", "streamed: read + canonicalize + spool the source")
    phases.wrap(stream, "_source_keys", "streamed: keys joined and checked over the table")
    phases.wrap(stream, "_churn", "streamed: diff on keys + hashes, write the target, gather the changes")
    phases.wrap(stream, "_first_load", "streamed: hash and write the target")
    phases.wrap(sync, "deliver", "encode + send (deliver)")
    phases.wrap(sync, "settle", "settle + commit")
    return phases


# ---------------------------------------------------------------------------------------------------------------
# profile (optional)
# ---------------------------------------------------------------------------------------------------------------
def profile_top(fn: Callable[[], Any], top: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof)
    total = max(stats.total_tt, 1e-9)  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((ct, tt, nc, _short(filename, line, func)))
    lines = [f"total {total:.2f} s (main thread; sending runs in worker threads)", "", "by own time:"]
    for ct, tt, nc, name in sorted(rows, key=lambda r: -r[1])[:top]:
        lines.append(f"  {tt:7.2f} s {tt / total:6.1%}  cum {ct:7.2f} s  calls {nc:>8}  {name}")
    lines += ["", "by cumulative time:"]
    for ct, tt, nc, name in sorted(rows, key=lambda r: -r[0])[:top]:
        lines.append(f"  {ct:7.2f} s {ct / total:6.1%}  own {tt:7.2f} s  calls {nc:>8}  {name}")
    return "\n".join(lines)


def _short(filename: str, line: int, func: str) -> str:
    """A location without machine paths: package-relative module and function."""
    if filename == "~":
        return func
    parts = Path(filename).parts
    for anchor in ("airflow_provider_stopchurn", "site-packages"):
        if anchor in parts:
            rel = parts[parts.index(anchor) + (1 if anchor == "site-packages" else 0) :]
            return f"{'/'.join(rel)}:{line} {func}"
    return f"{Path(filename).name}:{line} {func}"


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{psutil.virtual_memory().total / GB:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "polars": pl.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
        "orjson": orjson.__version__,
        "requests": requests.__version__,
        "adbc": dist_version("adbc-driver-postgresql"),
    }


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def fmt_bytes(n: float) -> str:
    return f"{n / MB:,.0f} MB"


def table_row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def above_text(nbytes: float) -> str:
    return f"+{fmt_bytes(nbytes)}"


def phase_table(phases: list[list[Any]], total_peak: int, what: str = "above start") -> list[str]:
    """The steps of one run: seconds and each step's own peak RSS."""
    out = [f"| step | seconds | peak RSS {what} during the step | frame it returned |", "|---|---|---|---|"]
    for label, seconds, peak, size in phases:
        out.append(table_row(label, f"{seconds:.2f}", above_text(peak), fmt_bytes(size) if size else ""))
    out.append(table_row("whole run (highest)", "", above_text(total_peak), ""))
    return out
