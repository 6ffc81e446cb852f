"""The streamed and whole worker paths on shapes their own differential tests leave out.

A composite key of text and integers with no ``id`` column (the id derived per spooled batch), kinds moving between
batches and between runs under every schema policy; and a snapshot past one join part (250k keys, joined in parts
split by the keys' hash) that holds a key twice."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pytest
from helpers_sync import BRAND, T0, TABLE, make_client, options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_streamed_worker_path import Source, _assert_same_plans, _check_runs, _rows

from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.stream import STREAM_ENV
from airflow_provider_stopchurn.update.sync import run_sync


@dataclass
class KeySource(Source):
    """A run's source keyed by ``(k1, k2)``; ``v`` is float from batch ``float_from``, ``w`` text from ``text_from``."""

    float_from: int | None = None

    def batches(self) -> list[pa.RecordBatch]:
        bounds = [0, *sorted(self.cuts), len(self.rows)]
        out = []
        for number, (start, end) in enumerate(itertools.pairwise(bounds)):
            flt = self.float_from is not None and number >= self.float_from
            text = self.text_from is not None and number >= self.text_from
            schema = pa.schema(
                [
                    ("k1", pa.string()),
                    ("k2", pa.int64()),
                    ("v", pa.float64() if flt else pa.int64()),
                    ("w", pa.string() if text else pa.int64()),
                ]
            )
            part = [
                dict(
                    r,
                    v=None if r["v"] is None else (float(r["v"]) if flt else r["v"]),
                    w=None if r["w"] is None else (str(r["w"]) if text else r["w"]),
                )
                for r in self.rows[start:end]
            ]
            out.append(pa.RecordBatch.from_pylist(part, schema=schema))
        return out


def _row(k: int, seed: int) -> dict[str, Any]:
    """Key text with the composite id's separator in it, values changing with ``seed``."""
    return {
        "k1": f"a|{k % 3}" if k % 2 else f"a{k % 3}",
        "k2": k,
        "v": None if (k + seed) % 5 == 0 else k + seed,
        "w": None if (k + seed) % 3 == 0 else k * seed,
    }


@st.composite
def runs(draw: st.DrawFn) -> list[KeySource]:
    """Two or three runs: keys added, removed and changed, cut into random batches, kinds moving between them."""
    out = []
    keys = draw(st.sets(st.integers(0, 40), max_size=20))
    for run in range(draw(st.integers(2, 3))):
        if run:
            gone = draw(st.sets(st.sampled_from(sorted(keys)), max_size=4)) if keys else set()
            keys = (keys - gone) | draw(st.sets(st.integers(0, 40), max_size=4))
        changed = draw(st.sets(st.integers(0, 40), max_size=6))
        ordered = draw(st.permutations(sorted(keys)))
        rows = [_row(k, run if k in changed else 0) for k in ordered]
        cuts = draw(st.lists(st.integers(0, len(rows)), max_size=4))
        out.append(
            KeySource(
                rows,
                cuts,
                draw(st.one_of(st.none(), st.integers(0, len(cuts)))),
                float_from=draw(st.one_of(st.none(), st.integers(0, len(cuts)))),
            )
        )
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sources=runs(), policy=st.sampled_from(["fail", "update_all", "rebaseline"]))
def test_composite_keys_same_on_both_paths(
    sources: list[KeySource],
    policy: str,
    stopchurn_sandbox_factory: Callable[..., SandboxServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Plans, targets, requests, errors and what StopChurn holds are the same on both paths, run after run."""
    kw: dict[str, Any] = {"key_columns": ("k1", "k2"), "on_schema_change": policy, "max_delete_fraction": 1.0}
    _check_runs(list[Source](sources), stopchurn_sandbox_factory, monkeypatch, "always", **kw)


#: past one join part of the key match
N = 260_000


@pytest.mark.parametrize("kept", [True, False])
def test_large_snapshot_holding_a_key_twice(
    kept: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopchurn_sandbox: SandboxServer
) -> None:
    """A snapshot of more keys than one join part holds three keys twice: both paths plan the same churn."""
    monkeypatch.setenv(STREAM_ENV, "never")
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run_sync(
        Source(_rows(range(N)), [N // 2]).stream(),
        store,
        make_client(stopchurn_sandbox),
        options(initial_load="baseline"),
        run_ms=T0,
    )
    committed = store.read_committed()
    assert committed is not None
    twice = pl.concat([committed.frame, committed.frame.filter(pl.col("id").is_in([4, 17, 200_001])).reverse()])
    pointer = orjson.loads(store.backend.read_bytes("CURRENT") or b"{}")
    pointer.update(version=store.write_snapshot(twice), rows=twice.height)
    store.backend.write_bytes("CURRENT", orjson.dumps(pointer), durable=True)
    rows = _rows(range(2, N + 5), seed=0)
    rows = [r for r in rows if kept or r["id"] != 17]
    rows[10] = _rows(range(12, 13), seed=1)[0]
    assert _assert_same_plans(Source(rows, [N // 3]), store, T0 + 1, monkeypatch, "always", max_delete_fraction=1.0)
