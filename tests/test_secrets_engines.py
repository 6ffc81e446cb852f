"""The API key and a base URL's secret parts never leak from any engine: worker and warehouse updates, events.

Each engine runs against the sandbox with a recognisable key while StopChurn answers with a page that echoes the
request (the key included), and while another run takes the table's lock; every logger is at DEBUG. The key must
appear in no log record, exception (causes and traceback included), summary or file the run left behind.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pytest
from helpers_sync import BRAND, T0, TABLE, list_files, options

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import event_store
from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

KEY = "sk-LEAKCHECK-engines-4b3a2918"
NEEDLES = (KEY, "LEAKCHECK", "4b3a2918")
ECHO = f"<html><pre>POST /client-data/update\nAuthorization: Bearer {KEY}</pre></html>"


def _runner(engine: str, root: Path, client: StopChurnClient) -> Callable[[], Any]:
    if engine == "worker":
        store = SnapshotStore(root, BRAND, TABLE)
        frame = pl.DataFrame({"id": [1, 2], "name": ["a", "b"]})
        return lambda: run_sync(frame, store, client, options(lock_wait_s=0), run_ms=T0)
    if engine == "warehouse-duckdb":
        import duckdb

        from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, WarehouseSource, run_warehouse_sync

        db = root.parent / "warehouse.duckdb"
        with duckdb.connect(str(db)) as con:
            con.execute("CREATE OR REPLACE TABLE src AS SELECT * FROM (VALUES (1, 'a'), (2, 'b')) AS t(id, name)")
        store = SnapshotStore(root, BRAND, TABLE)
        source = WarehouseSource("SELECT * FROM src", DuckDBWarehouse(str(db)), state_schema="stopchurn_state")
        return lambda: run_warehouse_sync(source, store, client, options(lock_wait_s=0), run_ms=T0)
    store = event_store(root, BRAND, "deposits")
    frame = pd.DataFrame({"user_id": [1, 2], "amount": [10, 20], "deposit_id": [1, 2]})
    opts = EventOptions(
        brand_id=BRAND, user_id_column="user_id", name="DEPOSIT", value_column="amount", event_key=("deposit_id",)
    )
    return lambda: run_events(frame, store, client, opts, stream="deposits")


def _texts(exc: BaseException) -> list[str]:
    out: list[str] = ["".join(traceback.format_exception(exc))]
    current: BaseException | None = exc
    while current is not None:
        out += [str(current), repr(current), repr(vars(current))]
        current = current.__cause__ or current.__context__
    return out


@pytest.mark.parametrize("engine", ["worker", "warehouse-duckdb", "events"])
@pytest.mark.parametrize("fault", ["200-echo", "500-echo", "401", "success"])
def test_no_engine_leaks_the_key(
    stopchurn_sandbox_factory: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    engine: str,
    fault: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "requests", "airflow_provider_stopchurn"):
        caplog.set_level(logging.DEBUG, logger=name)
    sb: SandboxServer = stopchurn_sandbox_factory(token=KEY)
    key = "sk-wrong-key-0000" if fault == "401" else KEY
    client = StopChurnClient(sb.url + "/", key, max_retries=1, backoff_base=0.001, backoff_max=0.002)
    for _ in range(2):
        if fault == "200-echo":
            sb.queue_response(200, ECHO, headers={"Content-Type": "text/html"})
        elif fault == "500-echo":
            sb.queue_response(500, ECHO, headers={"Content-Type": "text/html"})
    root = tmp_path / "snapshots"
    texts: list[str] = []
    try:
        texts.append(repr(_runner(engine, root, client)()))
    except StopChurnError as err:
        assert fault != "success", err
        texts += _texts(err)
    else:
        assert fault == "success"
    texts += [r.getMessage() for r in caplog.records] + [repr(r.__dict__) for r in caplog.records]
    out, err_out = capfd.readouterr()
    texts += [out, err_out, repr(client)]
    texts += [path.read_bytes().decode("utf-8", "replace") for path in list_files(tmp_path)]
    leaks = [(needle, text[:200]) for text in texts for needle in NEEDLES if needle in text]
    assert leaks == []
    client.close()
