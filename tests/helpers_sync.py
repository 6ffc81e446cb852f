"""Shared helpers of the engine tests: seeded churn, source <-> sandbox comparison, clients, file digests.

Nothing here mocks the engine: the helpers build real DataFrames, real clients talking to a real sandbox on
127.0.0.1, and read real files.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.encode.records import encode_rows
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.source.frame import canonicalize

BRAND = 7
TABLE = "subscription"
T0 = 1_700_000_000_000  # a fixed run time (epoch ms); tests add offsets for later runs
_WORDS = ("alpha", "beta", "gamma", "delta", "émile", "naïve", "東京", 'quote"d', "back\\slash", "")
_REGIONS = ("eu", "us", "apac")


# --- clients ---------------------------------------------------------------------------------------------------
def make_client(
    sandbox: SandboxServer, *, api_key: str | None = None, max_retries: int = 0, **kwargs: Any
) -> StopChurnClient:
    """A client of ``sandbox`` with near-zero backoff (tests never sleep for long)."""
    kwargs.setdefault("backoff_base", 0.001)
    kwargs.setdefault("backoff_max", 0.005)
    kwargs.setdefault("timeout", 10.0)
    kwargs.setdefault("connect_timeout", 5.0)
    return StopChurnClient(
        sandbox.url, api_key if api_key is not None else sandbox.token, max_retries=max_retries, **kwargs
    )


def options(**kwargs: Any) -> SyncOptions:
    """SyncOptions of the test table, with any field overridden."""
    kwargs.setdefault("brand_id", BRAND)
    kwargs.setdefault("table_name", TABLE)
    return SyncOptions(**kwargs)


class RecordingSender:
    """Delegates to a real client and keeps every body it was asked to send (successful or not)."""

    def __init__(self, client: StopChurnClient) -> None:
        self.client = client
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()

    def post_update_body(self, body: bytes) -> Any:
        with self._lock:
            self.bodies.append(body)
        return self.client.post_update_body(body)

    def post_event_body(self, body: bytes) -> Any:
        with self._lock:
            self.bodies.append(body)
        return self.client.post_event_body(body)

    def updates(self) -> list[dict[str, Any]]:
        """Every update of every body, in the order the bodies were handed over."""
        return [u for body in self.bodies for u in orjson.loads(body)["data"]]


class FailAfter:
    """Delegates to a real client; after ``n`` accepted requests it switches the sandbox to fail every request.

    The failure is the sandbox's own (500 from an ``error_rate=1.0`` fault), so the client maps it as in real
    life; the switch happens in the sending thread right after the n-th acknowledgement.
    """

    def __init__(self, client: StopChurnClient, sandbox: SandboxServer, n: int) -> None:
        self.client = client
        self.sandbox = sandbox
        self.n = n
        self.accepted = 0
        self._lock = threading.Lock()

    def post_update_body(self, body: bytes) -> Any:
        return self._count(self.client.post_update_body(body))

    def post_event_body(self, body: bytes) -> Any:
        return self._count(self.client.post_event_body(body))

    def _count(self, result: Any) -> Any:
        with self._lock:
            self.accepted += 1
            if self.accepted == self.n:
                self.sandbox.set_faults(FaultConfig(error_rate=1.0))
        return result


class FailOne:
    """Delegates to a real client, except the body whose first row id is ``bad_id``: after ``delay_s`` that one
    goes to ``failing`` (a client of a sandbox that answers 500 to everything), so it fails while the bodies
    sent after it are acknowledged: acknowledgements arrive out of order.
    """

    def __init__(self, client: StopChurnClient, failing: StopChurnClient, bad_id: Any, delay_s: float) -> None:
        self.client = client
        self.failing = failing
        self.bad_id = bad_id
        self.delay_s = delay_s
        self.failed = threading.Event()

    def post_update_body(self, body: bytes) -> Any:
        first = orjson.loads(body)["data"][0]["data"]["data"]["id"]
        if first == self.bad_id:
            self.failed.wait(self.delay_s)  # a bounded pause; nothing sets the event early
            try:
                return self.failing.post_update_body(body)
            finally:
                self.failed.set()
        return self.client.post_update_body(body)


# --- seeded churn ----------------------------------------------------------------------------------------------
class Churn:
    """A table that changes at random between runs: inserts, updates (NaN/None included) and deletes.

    ``composite=True`` keys rows by (``region``, ``num``) and has no ``id`` column (the engine builds one);
    otherwise the key is the integer ``id``. ``with_json`` adds an object column of dicts (nested JSON).
    """

    def __init__(self, seed: int, rows: int, *, composite: bool = False, with_json: bool = True) -> None:
        self.rng = np.random.default_rng(seed)
        self.composite = composite
        self.with_json = with_json
        self._next = 0
        self.frame = self._new_rows(rows)

    @property
    def keys(self) -> tuple[str, ...]:
        return ("region", "num") if self.composite else ("id",)

    def _values(self, n: int) -> dict[str, Any]:
        rng = self.rng
        score = rng.normal(50, 20, n).round(3)
        score[rng.random(n) < 0.1] = np.nan
        names = np.array([_WORDS[i] for i in rng.integers(0, len(_WORDS), n)], dtype=object)
        names[rng.random(n) < 0.1] = None
        cols: dict[str, Any] = {
            "score": score,
            "name": names,
            "qty": rng.integers(-1000, 1000, n).astype("int64"),
            "active": rng.random(n) < 0.5,
        }
        if self.with_json:
            meta = [
                None if r < 0.2 else {"tier": int(t), "tags": [_WORDS[int(t) % len(_WORDS)]]}
                for r, t in zip(rng.random(n), rng.integers(0, 5, n), strict=True)
            ]
            column = np.empty(n, dtype=object)  # keep the dicts as objects
            column[:] = meta
            cols["meta"] = column
        return cols

    def _new_rows(self, n: int) -> pd.DataFrame:
        ids = np.arange(self._next, self._next + n, dtype="int64")
        self._next += n
        if self.composite:
            key: dict[str, Any] = {
                "region": np.array([_REGIONS[i % len(_REGIONS)] for i in ids], dtype=object),
                "num": ids // len(_REGIONS),
            }
        else:
            key = {"id": ids}
        return pd.DataFrame({**key, **self._values(n)})

    def step(self, *, deletes: float = 0.1, updates: float = 0.2, inserts: float = 0.1) -> pd.DataFrame:
        """Churn the table once and return it (a fresh DataFrame, rows shuffled)."""
        rng = self.rng
        frame = self.frame
        n = len(frame)
        keep = rng.random(n) >= deletes
        frame = frame.loc[keep].reset_index(drop=True)
        n = len(frame)
        upd = np.flatnonzero(rng.random(n) < updates)
        if len(upd):
            fresh = self._values(len(upd))
            for col, values in fresh.items():
                # change a random subset of the columns of each updated row
                touch = rng.random(len(upd)) < 0.6
                idx = upd[touch]
                if len(idx):
                    column = frame[col].to_numpy(copy=True)
                    column[idx] = np.asarray(values, dtype=column.dtype)[touch]
                    frame[col] = column
        added = self._new_rows(round(max(1, len(self.frame)) * inserts))
        frame = pd.concat([frame, added], ignore_index=True)
        frame = frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)
        self.frame = frame
        return frame.copy()


def deterministic_table(seed: int, rows: int) -> pd.DataFrame:
    """The same table for the same (seed, rows), in any process."""
    return Churn(seed, rows, with_json=False).frame.copy()


# --- comparison ------------------------------------------------------------------------------------------------
def _row_key(row: dict[str, Any]) -> tuple[str, Any]:
    return (type(row["id"]).__name__, row["id"])


def expected_rows(frame: pd.DataFrame, keys: Sequence[str] = ("id",)) -> dict[tuple[str, Any], dict[str, Any]]:
    """The source as StopChurn should hold it: canonical rows, JSON-normalised, keyed like the sandbox."""
    canon = canonicalize(frame, key_columns=keys)
    texts = encode_rows(canon.frame, canon.kinds).to_list()
    rows = [json.loads(t) for t in texts]
    return {_row_key(r): r for r in rows}


def sandbox_rows(sandbox: SandboxServer, brand_id: int = BRAND, table: str = TABLE) -> dict[tuple[str, Any], Any]:
    return {_row_key(r): r for r in sandbox.rows(brand_id, table)}


def assert_sandbox_matches(
    sandbox: SandboxServer,
    frame: pd.DataFrame,
    keys: Sequence[str] = ("id",),
    *,
    brand_id: int = BRAND,
    table: str = TABLE,
) -> None:
    """Sandbox table == source, row for row (nothing lost, no phantom rows, no stale values)."""
    want = expected_rows(frame, keys)
    got = sandbox_rows(sandbox, brand_id, table)
    missing = [k for k in want if k not in got]
    phantom = [k for k in got if k not in want]
    stale = [k for k in want if k in got and got[k] != want[k]]
    if missing or phantom or stale:
        detail = f"{len(missing)} missing {missing[:3]}, {len(phantom)} phantom {phantom[:3]}, {len(stale)} stale"
        if stale:
            k = stale[0]
            detail += f"; e.g. {k}: sandbox {got[k]!r} != source {want[k]!r}"
        raise AssertionError(f"sandbox != source ({len(got)} vs {len(want)} rows): {detail}")


def plain_rows(records: Iterable[dict[str, Any]]) -> dict[tuple[str, Any], dict[str, Any]]:
    """Hand-written expected rows keyed like the sandbox (for small, explicit cases)."""
    return {_row_key(r): r for r in records}


def change_counts(before: dict[tuple[str, Any], Any], after: dict[tuple[str, Any], Any]) -> tuple[int, int, int]:
    """(inserted, updated, deleted) between two expected states, computed independently of the engine."""
    inserted = sum(1 for k in after if k not in before)
    deleted = sum(1 for k in before if k not in after)
    updated = sum(1 for k in after if k in before and before[k] != after[k])
    return inserted, updated, deleted


# --- deliveries ------------------------------------------------------------------------------------------------
def received_counts(received: Iterable[tuple[str, int, str, Any]]) -> Counter[tuple[str, Any]]:
    """How often each (type, id) was applied."""
    return Counter((kind, row_id) for kind, _brand, _table, row_id in received)


def resent(received: Iterable[tuple[str, int, str, Any]]) -> int:
    """Updates applied more than once (extra copies)."""
    return sum(c - 1 for c in received_counts(received).values() if c > 1)


def update_requests(sandbox: SandboxServer) -> int:
    """StopChurn API requests the sandbox saw (inspection calls are not counted)."""
    return int(sandbox.stats()["requests"])


# --- files -----------------------------------------------------------------------------------------------------
def list_files(root: Any) -> list[Any]:
    """Every file under ``root`` (a pathlib.Path or an ObjectStoragePath); [] when it does not exist."""
    if not root.exists():
        return []
    if isinstance(root, Path):
        return sorted(p for p in root.rglob("*") if p.is_file())
    out: list[Any] = []
    stack = [root]
    for _ in range(100_000):
        if not stack:
            break
        here = stack.pop()
        for child in here.iterdir():
            if child.is_dir():
                stack.append(child)
            else:
                out.append(child)
    return sorted(out, key=str)


def tree_digest(root: Any, *, history: bool = True) -> dict[str, str]:
    """{relative path: sha256 of the content} of every file under ``root``.

    :param history: include the stores' history records (False: a run that must change nothing of a store but
        still records how it ended leaves the same digest).
    """
    digest: dict[str, str] = {}
    base = str(root).rstrip("/")
    for path in list_files(root):
        if not history and "/history/" in str(path)[len(base) :]:
            continue
        with path.open("rb") as fh:
            digest[str(path)[len(base) :]] = hashlib.sha256(fh.read()).hexdigest()
    return digest


def read_json(path: Any) -> dict[str, Any]:
    with path.open("rb") as fh:
        data: dict[str, Any] = json.loads(fh.read())
    return data


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passed (bounded); return its last value."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return bool(predicate())
