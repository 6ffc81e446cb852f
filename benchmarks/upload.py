"""The memory of writing a streamed snapshot to an object store, for checkouts of this project side by side.

Usage::

    python benchmarks/upload.py --checkout before=/path/to/older/checkout --checkout after=. [--rows 10000000]

Each checkout writes the same seeded snapshot (``--rows`` rows of an ``id`` and 8 random 64-bit integers, which do
not compress: about 72 bytes a row in Parquet) through ``SnapshotStore.write_snapshot_frames`` to an object store,
in a fresh child process per checkout and repetition. The frames are made as the writer asks for them, so what the
child holds above its start is the writer's and the upload's. The object store is an fsspec file system whose
objects are files in a temporary folder (a write goes to disk as it comes, as a network upload would leave it), so
the store itself holds nothing in memory. Peak RSS is the child's VmHWM, reset just before the write.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import fsspec, numpy as np, polars as pl, psutil, warnings
from fsspec.implementations.local import LocalFileSystem
from upath import UPath
from airflow_provider_stopchurn.store import SnapshotStore

class DiskObjects(LocalFileSystem):
    protocol = ("diskobjects",)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("diskobjects://"))

fsspec.register_implementation("diskobjects", DiskObjects, clobber=True)
rows, folder = int(sys.argv[2]), sys.argv[3]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    store = SnapshotStore(UPath(f"diskobjects://{folder}"), 1, "upload")
step = 131_072

def frames():
    rng = np.random.default_rng(22)
    for offset in range(0, rows, step):
        n = min(step, rows - offset)
        data = {f"c{i}": rng.integers(-(2**62), 2**62, size=n, dtype=np.int64) for i in range(8)}
        yield pl.DataFrame({"id": np.arange(offset, offset + n, dtype=np.int64), **data})

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
start = psutil.Process().memory_info().rss
began = time.perf_counter()
version, written = store.write_snapshot_frames(frames())
seconds = time.perf_counter() - began
size = sum(p.stat().st_size for p in __import__("pathlib").Path(folder).rglob("*.parquet"))
print(json.dumps({"rows": written, "bytes": size, "seconds": seconds, "above_start": hwm() - start}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", required=True, help="LABEL=PATH of a checkout")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    print(f"rows={args.rows:,}; peak RSS above the start of each fresh child, VmHWM reset before the write")
    print("| checkout | repetition | snapshot MB | seconds | peak RSS above start |")
    print("|---|---|---|---|---|")
    for rep in range(args.reps):
        for item in args.checkout:
            label, _, path = item.partition("=")
            with tempfile.TemporaryDirectory(prefix="stopchurn-upload-bench-") as folder:
                done = subprocess.run(
                    [sys.executable, "-c", _CHILD, str(Path(path).resolve()), str(args.rows), folder],
                    capture_output=True,
                    text=True,
                    check=True,
                )
            got = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"| {label} | {rep + 1} | {got['bytes'] / 2**20:,.0f} | {got['seconds']:.1f} | "
                f"+{got['above_start'] / 2**20:,.0f} MB |"
            )


if __name__ == "__main__":
    main()
