"""How small the warehouse state table's row values get with a zstd dictionary (issue 22, "state table size").

Not a dependency of the package: the measurement that decides whether to make it one. The values are the
benchmark's SQL rows (``synthetic.sql_rows``) as the state table keeps them (each value's JSON text, joined by the
unit separator, ``warehouse/rows.py``); a dictionary is trained on the first ``--train`` rows and every row is
compressed on its own, as a state row would be. Needs ``pip install zstandard``.

    python benchmarks/state_compression.py --rows 200000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import sql_rows

US = "\x1f"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--level", type=int, default=3)
    args = parser.parse_args()
    try:
        import zstandard
    except ImportError:
        print("needs zstandard: pip install zstandard", file=sys.stderr)
        return 2
    frame = sql_rows(0, args.rows, 1)
    rows = [
        US.join(json.dumps(v, default=str, separators=(",", ":")) for v in row).encode() for row in frame.iter_rows()
    ]
    plain = sum(map(len, rows))
    print(f"{len(rows):,} rows, {plain / len(rows):.1f} bytes of values a row (zstandard {zstandard.__version__})")
    bare = zstandard.ZstdCompressor(level=args.level, write_content_size=False, write_checksum=False)
    print(f"no dictionary: {plain / sum(len(bare.compress(r)) for r in rows):.2f}x")
    for size in (16_384, 65_536, 112_640):
        trained = zstandard.train_dictionary(size, rows[: args.train])
        compressor = zstandard.ZstdCompressor(
            level=args.level, dict_data=trained, write_content_size=False, write_checksum=False, write_dict_id=False
        )
        packed = sum(len(compressor.compress(r)) for r in rows)
        print(f"dictionary of {size:,} bytes: {plain / packed:.2f}x, {packed / len(rows):.1f} bytes a row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
