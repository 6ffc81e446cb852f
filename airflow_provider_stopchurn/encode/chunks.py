"""Encoded updates -> request bodies ``{"data":[...]}``, each bounded by a row count and a byte size.

:func:`plan_chunks` cuts the updates that :func:`~airflow_provider_stopchurn.encode.records.encode_updates` wrote
into ranges, :func:`bodies_bytes` sums the bodies' sizes, :func:`chunk_body` builds one body and
:func:`chunk_bodies` the bodies of many chunks in one pass (no Airflow import).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import polars as pl

from airflow_provider_stopchurn.exceptions import SourceDataError

__all__ = ["bodies_bytes", "chunk_bodies", "chunk_body", "plan_chunks"]

_BODY_HEAD = b'{"data":['
_BODY_TAIL = b"]}"
#: A body of n updates is ``len(head) + sum(sizes) + (n - 1) commas + len(tail)`` bytes.
_BODY_OVERHEAD = len(_BODY_HEAD) + len(_BODY_TAIL)


def plan_chunks(sizes: np.ndarray, *, chunk_size: int, max_chunk_bytes: int) -> list[tuple[int, int]]:
    """Greedy ``[start, end)`` ranges over updates of the given UTF-8 byte ``sizes``, in order.

    Each body ``{"data":[u1,u2,...]}`` holds at most ``chunk_size`` updates and ``max_chunk_bytes`` bytes.
    An update too large for a body on its own raises :class:`SourceDataError`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1; got {chunk_size}.")
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be at least 1; got {max_chunk_bytes}.")
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(sizes.shape[0])
    if n == 0:
        return []
    # cum[i] = bytes of updates [0, i) each followed by a comma; body(s, e) = cum[e] - cum[s] - 1 + overhead.
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes + 1, out=cum[1:])
    budget = max_chunk_bytes - _BODY_OVERHEAD + 1
    ranges: list[tuple[int, int]] = []
    start = 0
    while start < n:
        fit = int(np.searchsorted(cum, cum[start] + budget, side="right")) - 1
        end = min(fit, start + chunk_size, n)
        if end <= start:
            size = int(sizes[start])
            raise SourceDataError(
                f"Update at position {start} is {size} bytes; with the request envelope it needs "
                f"{size + _BODY_OVERHEAD} bytes, above the limit max_chunk_bytes={max_chunk_bytes}. "
                "Shrink the row (drop or truncate large columns) or raise max_chunk_bytes."
            )
        ranges.append((start, end))
        start = end
    return ranges


def bodies_bytes(sizes: np.ndarray, chunks: Sequence[tuple[int, int]]) -> int:
    """Total bytes of the request bodies of ``chunks`` (envelopes and commas included)."""
    separators = sum(_BODY_OVERHEAD + max(end - start - 1, 0) for start, end in chunks)
    return (int(sizes.sum()) if len(sizes) else 0) + separators


def chunk_body(updates: pl.Series | Sequence[bytes], start: int, end: int) -> bytes:
    """The request body ``{"data":[...]}`` for updates ``[start, end)``."""
    n = len(updates)
    if not 0 <= start <= end <= n:
        raise ValueError(f"Invalid chunk range [{start}, {end}) for {n} updates.")
    if isinstance(updates, pl.Series):
        joined = updates.slice(start, end - start).str.join(",").item()
        inner = (joined or "").encode()
    else:
        inner = b",".join(bytes(u) for u in updates[start:end])
    return _BODY_HEAD + inner + _BODY_TAIL


def chunk_bodies(
    updates: pl.Series, chunks: Sequence[tuple[int, int]], todo: Sequence[int], *, window: int
) -> Iterator[tuple[int, bytes]]:
    """(chunk, request body) of the chunks still to send, in order.

    Bodies are built ``window`` chunks at a time, each window in one polars group-by over just its updates, so
    no more than a window of bodies is held beside the encoded updates.
    """
    for first in range(0, len(todo), window):
        part = todo[first : first + window]
        lo, hi = chunks[part[0]][0], chunks[part[-1]][1]
        lengths = np.array([chunks[i][1] - chunks[i][0] for i in range(part[0], part[-1] + 1)], dtype=np.int64)
        chunk_of = np.repeat(np.arange(part[0], part[-1] + 1, dtype=np.int64), lengths)
        frame = pl.DataFrame({"chunk": chunk_of, "update": updates.slice(lo, hi - lo)})
        if len(part) != part[-1] - part[0] + 1:  # a resumed plan: skip the chunks acknowledged already
            frame = frame.filter(pl.col("chunk").is_in(list(part)))
        grouped = frame.group_by("chunk", maintain_order=True).agg(
            pl.concat_str([pl.lit(_BODY_HEAD.decode()), pl.col("update").str.join(","), pl.lit(_BODY_TAIL.decode())])
            .cast(pl.Binary)
            .alias("body")
        )
        yield from zip(grouped["chunk"].to_list(), grouped["body"].to_list(), strict=True)
