"""StopChurnUpdateOperator end to end: real DAG runs (``dag.test()``), a real metadata DB, the sandbox API.

After every run the sandbox's table must equal the source exactly, whatever the source (a DataFrame from an
upstream task's XCom, a callable, SQL on SQLite) and whatever changed in between (seeded random inserts,
updates and deletes).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pendulum
import pytest
from airflow.sdk import DAG, task
from airflow_plugin import airflow_version, dag_bag, point_stopchurn_default, run_dag, task_states, xcom_return
from fault_strategies import seed_failing_third_request
from operator_fixtures import brand_fixture, memory_fs_fixture

from airflow_provider_stopchurn.operators import lineage
from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer

pytestmark = pytest.mark.usefixtures("airflow_db")
# Tests marked `matrix` also run on every supported Airflow version (make test-matrix): each source kind, XCom,
# the example DAGs, object storage, and a retry after a failed try.

START = pendulum.datetime(2025, 1, 1, tz="UTC")
# Runs per multi-run test. dag.test() on Airflow before 3.3 spends about a second on each call to its in-process
# execution API (5-7 s a run): there the first load and one run of changes are enough.
RUNS = 4 if airflow_version() >= (3, 3) else 2

#: Keys of the summary every run returns (docs/update-operator.md: "What a run reports").
SUMMARY_KEYS = {
    "table_name",
    "brand_id",
    "inserted",
    "updated",
    "deleted",
    "unchanged",
    "chunks",
    "bytes",
    "requests",
    "retries",
    "settled_chunks",
    "settled_from_other_runs",
    "quarantined",
    "rejected",
    "dry_run",
    "baseline",
    "schema_change",
    "snapshot_uri",
    "duration_s",
}

_dag_ids = itertools.count(1)


# --- data ------------------------------------------------------------------------------------------------------
def users_frame(rng: random.Random, n: int, first_id: int = 1) -> pd.DataFrame:
    """Rows shaped like an application's ``users`` table (flat; booleans as 0/1, as SQLite stores them)."""
    ids = range(first_id, first_id + n)
    return pd.DataFrame(
        {
            "id": list(ids),
            "email": [f"user{i}@example.com" for i in ids],
            "first_name": [rng.choice(["Ana", "Ben", "Chloé", "Dev", "Eve"]) for _ in ids],
            "last_name": [rng.choice(["Ng", "Smith", "Ďurová", None]) for _ in ids],
            "status": [rng.choice(["active", "paused", "cancelled"]) for _ in ids],
            "signed_up_at": [1_700_000_000_000 + rng.randrange(10**9) for _ in ids],
            "marketing_email": [rng.randint(0, 1) for _ in ids],
            "marketing_sms": [rng.randint(0, 1) for _ in ids],
            "system_email": [rng.randint(0, 1) for _ in ids],
            "system_sms": [rng.randint(0, 1) for _ in ids],
        }
    )


def mutate(frame: pd.DataFrame, rng: random.Random, keys: list[str], make_rows: Callable[[int], pd.DataFrame]):
    """Delete, update and insert a few random rows; return ``(new_frame, (inserted, updated, deleted))``."""
    n = len(frame)
    positions = list(range(n))
    rng.shuffle(positions)
    n_del, n_upd = max(1, n // 20), max(1, n // 10)
    deleted = positions[:n_del]
    updated = positions[n_del : n_del + n_upd]
    frame = frame.copy()
    value_columns = [c for c in frame.columns if c not in keys]
    for pos in updated:
        column = rng.choice(value_columns)
        current = frame.iloc[pos][column]
        frame.iat[pos, frame.columns.get_loc(column)] = _changed(current, rng)
    kept = frame.drop(index=frame.index[deleted])
    added = make_rows(max(1, n // 20))
    return pd.concat([kept, added], ignore_index=True), (len(added), len(updated), len(deleted))


def _changed(value: Any, rng: random.Random) -> Any:
    value = value.item() if hasattr(value, "item") else value  # numpy scalar -> Python
    if value is None:
        return "set"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int) and value in (0, 1):
        return 1 - value
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return value + 1 + rng.randrange(100)
    return f"{value}-{rng.randrange(10**6)}"


def expected_rows(frame: pd.DataFrame, keys: list[str]) -> list[dict[str, Any]]:
    """The rows StopChurn should hold for ``frame``: dotted columns nested, missing ``id`` made from the key."""
    rows = []
    for record in json.loads(frame.to_json(orient="records")):
        row: dict[str, Any] = {}
        for name, value in record.items():
            head, _, tail = name.partition(".")
            if tail:
                row.setdefault(head, {})[tail] = value
            else:
                row[name] = value
        if "id" not in row:
            row["id"] = ":".join(str(record[k]) for k in keys) if len(keys) > 1 else record[keys[0]]
        rows.append(row)
    return sorted(rows, key=lambda r: (type(r["id"]).__name__, r["id"]))


def assert_in_step(sandbox: SandboxServer, brand_id: int, table: str, frame: pd.DataFrame, keys: list[str]):
    assert sandbox.rows(brand_id, table) == expected_rows(frame, keys)


# --- DAG helpers -----------------------------------------------------------------------------------------------
def new_dag_id(name: str) -> str:
    return f"e2e_{name}_{next(_dag_ids)}"


def sync_dag(name: str, **operator_kwargs: Any) -> DAG:
    """A one-task DAG running the operator."""
    with DAG(new_dag_id(name), schedule=None, start_date=START, catchup=False) as dag:
        StopChurnUpdateOperator(task_id="sync", **operator_kwargs)
    return dag


def run_ok(dag: DAG, day: int, task_id: str | None = "sync") -> dict[str, Any]:
    """Run ``dag`` for day ``day`` (0-based); assert success; return the sync task's summary from XCom."""
    dagrun = run_dag(dag, logical_date=START.add(days=day))
    assert str(dagrun.state) == "success", task_states(dagrun)
    if task_id is None:
        return {}
    summary = xcom_return(dagrun, task_id)
    assert isinstance(summary, dict)
    return summary


def snapshot_files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


brand_id = brand_fixture(100, name="brand_id")


@pytest.fixture
def sandbox(stopchurn_conn: SandboxServer) -> SandboxServer:
    return stopchurn_conn


# --- sources ---------------------------------------------------------------------------------------------------
@pytest.mark.matrix
def test_dataframe_from_upstream_task_via_xcom_composite_key(sandbox: SandboxServer, tmp_path: Path) -> None:
    rng = random.Random(11)
    keys = ["tenant", "code"]
    serial = itertools.count()

    def make_rows(n: int) -> pd.DataFrame:
        nums = [next(serial) for _ in range(n)]
        return pd.DataFrame(
            {
                "tenant": [f"t{i % 3}" for i in nums],
                "code": nums,
                "plan": [rng.choice(["free", "pro", "team"]) for _ in nums],
                "seats": [rng.randint(1, 50) for _ in nums],
                "mrr": [round(rng.uniform(0, 500), 2) for _ in nums],
                "trial": [rng.random() < 0.3 for _ in nums],
            }
        )

    state = {"frame": make_rows(120)}
    with DAG(new_dag_id("xcom"), schedule=None, start_date=START, catchup=False) as dag:

        @task
        def build_frame() -> pd.DataFrame:
            return state["frame"].copy()

        StopChurnUpdateOperator(
            task_id="sync",
            table_name="subscription",
            dataframe=build_frame(),
            primary_key=keys,
            snapshot_uri=str(tmp_path / "snapshots"),
            chunk_size=25,
        )

    expected_counts = (120, 0, 0)
    for day in range(RUNS):
        summary = run_ok(dag, day)
        assert (summary["inserted"], summary["updated"], summary["deleted"]) == expected_counts
        assert_in_step(sandbox, 1, "subscription", state["frame"], keys)
        state["frame"], expected_counts = mutate(state["frame"], rng, keys, make_rows)


@pytest.mark.matrix
def test_callable_source(sandbox: SandboxServer, tmp_path: Path) -> None:
    rng = random.Random(22)
    next_id = itertools.count(1)
    state = {"frame": users_frame(rng, 80)}

    def make_rows(n: int) -> pd.DataFrame:
        return users_frame(rng, n, first_id=1000 + next(next_id) * 100)

    calls: list[str] = []

    def read_table(context: Any) -> pd.DataFrame:
        calls.append(context["run_id"])
        return state["frame"].copy()

    dag = sync_dag(
        "callable",
        table_name="account",
        dataframe=read_table,
        snapshot_uri=str(tmp_path / "snapshots"),
    )
    assert calls == []  # building the DAG called nothing
    expected_counts = (80, 0, 0)
    for day in range(RUNS):
        summary = run_ok(dag, day)
        assert (summary["inserted"], summary["updated"], summary["deleted"]) == expected_counts
        assert_in_step(sandbox, 1, "account", state["frame"], ["id"])
        state["frame"], expected_counts = mutate(state["frame"], rng, ["id"], make_rows)
    assert len(calls) == RUNS


def _write_users(path: Path, frame: pd.DataFrame) -> None:
    with sqlite3.connect(path) as conn:
        frame.to_sql("users", conn, if_exists="replace", index=False)


@pytest.fixture
def demo_db(tmp_path: Path, airflow_conn: Callable[..., None]) -> Path:
    """A SQLite database file behind the connection ``stopchurn_demo_db`` (the example DAGs' source)."""
    path = tmp_path / "app.db"
    airflow_conn("stopchurn_demo_db", conn_type="sqlite", host=str(path))
    return path


def _user_rows_from_db(path: Path) -> pd.DataFrame:
    query = (Path(__file__).parent.parent / "example_dags" / "sql" / "users.sql").read_text()
    with sqlite3.connect(path) as conn:
        return pd.read_sql_query(query, conn)


@pytest.mark.matrix
def test_sql_source_on_sqlite(sandbox: SandboxServer, demo_db: Path, tmp_path: Path) -> None:
    """A templated query with parameters on a SQLite file, through a ``sqlite`` connection."""
    rng = random.Random(30)
    serial = itertools.count(1)
    columns = ["id", "email", "first_name", "last_name", "status", "signed_up_at"]
    frame = users_frame(rng, 120)[columns]
    _write_users(demo_db, frame)
    query = "SELECT id, email, first_name, last_name, status, signed_up_at FROM {{ params.table }} WHERE id > ?"
    with DAG(new_dag_id("sql"), schedule=None, start_date=START, params={"table": "users"}) as dag:
        StopChurnUpdateOperator(
            task_id="sync",
            table_name="account",
            sql=query,
            parameters=[0],
            sql_conn_id="stopchurn_demo_db",
            snapshot_uri=str(tmp_path / "snapshots"),
        )
    expected_counts = (120, 0, 0)
    for day in range(RUNS):
        summary = run_ok(dag, day)
        assert (summary["inserted"], summary["updated"], summary["deleted"]) == expected_counts
        with sqlite3.connect(demo_db) as conn:
            source = pd.read_sql_query(query.replace("{{ params.table }}", "users"), conn, params=[0])
        assert_in_step(sandbox, 1, "account", source, ["id"])
        frame, expected_counts = mutate(
            frame, rng, ["id"], lambda n: users_frame(rng, n, first_id=10_000 * next(serial))[columns]
        )
        _write_users(demo_db, frame)


@pytest.mark.matrix
def test_sql_source_nightly_example_dag(
    sandbox: SandboxServer, demo_db: Path, brand_id: int, airflow_conn: Callable[..., None], example_dagbag: Any
) -> None:
    """The nightly example DAG itself, against a temp SQLite file: StopChurn's ``user`` table stays in step."""
    point_stopchurn_default(airflow_conn, sandbox, brand_id)
    rng = random.Random(33)
    serial = itertools.count(1)
    frame = users_frame(rng, 150)
    _write_users(demo_db, frame)
    dag = example_dagbag.dags["example_stopchurn_sql_nightly"]
    expected_counts = (150, 0, 0)
    for day in range(RUNS):
        summary = run_ok(dag, day, task_id="sync_users")
        assert (summary["inserted"], summary["updated"], summary["deleted"]) == expected_counts
        assert summary["brand_id"] == brand_id  # from the connection's extras
        source = _user_rows_from_db(demo_db)
        assert_in_step(sandbox, brand_id, "user", source, ["id"])
        for row in sandbox.rows(brand_id, "user"):  # SQLite's 0/1 arrive as JSON booleans
            for obj in ("marketingPreferences", "systemPreferences"):
                assert set(row[obj]) == {"email", "phone"}
                assert all(type(flag) is bool for flag in row[obj].values()), row
        frame, expected_counts = mutate(
            frame, rng, ["id"], lambda n: users_frame(rng, n, first_id=10_000 * next(serial))
        )
        _write_users(demo_db, frame)


@pytest.mark.matrix
def test_asset_example_dags(
    sandbox: SandboxServer, demo_db: Path, brand_id: int, airflow_conn: Callable[..., None], example_dagbag: Any
) -> None:
    """ETL -> asset -> sync -> StopChurn table asset (counts in the event's extra) -> a report DAG reading them."""
    point_stopchurn_default(airflow_conn, sandbox, brand_id)  # the sync names brand 1 itself, with its asset
    rng = random.Random(44)
    users = users_frame(rng, 60)
    _write_users(demo_db, users)
    etl = example_dagbag.dags["example_stopchurn_asset_etl"]
    sync = example_dagbag.dags["example_stopchurn_asset_sync"]
    report = example_dagbag.dags["example_stopchurn_asset_report"]
    assert [a.name for a in etl.task_dict["build_user_segments"].outlets] == ["stopchurn_demo_user_segments"]
    table_uri = "stopchurn://marketplace.stopchurn.com/1/userSegment"
    for day, changes in enumerate([None, (5, 3)]):
        if changes is not None:  # some users leave, some change status
            gone, changed = changes
            users = users.iloc[gone:].copy()
            users.loc[users.index[:changed], "status"] = "churned"  # a status no row had
            _write_users(demo_db, users)
        run_ok(etl, day, task_id=None)
        summary = run_ok(sync, day, task_id="sync_user_segments")
        with sqlite3.connect(demo_db) as conn:
            segments = pd.read_sql_query("SELECT id, segment, status FROM user_segments", conn)
        assert_in_step(sandbox, 1, "userSegment", segments, ["id"])

        extra = _latest_asset_event_extra(table_uri)
        assert extra == {key: summary[key] for key in lineage.EVENT_EXTRA_KEYS}
        assert "sandbox-test-key" not in json.dumps(extra)
        reported = run_ok(report, day, task_id="report_sync")
        assert reported == {k: summary[k] for k in ("inserted", "updated", "deleted", "quarantined", "dry_run")}
    assert (reported["inserted"], reported["updated"], reported["deleted"]) == (0, 3, 5)


def _latest_asset_event_extra(uri: str) -> dict[str, Any]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = (
            select(AssetEvent.extra)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == uri)
            .order_by(AssetEvent.id.desc())
            .limit(1)
        )
        return dict(session.scalars(query).one())


@pytest.mark.matrix
def test_xcom_example_dag(
    sandbox: SandboxServer, demo_db: Path, brand_id: int, airflow_conn: Callable[..., None], example_dagbag: Any
) -> None:
    point_stopchurn_default(airflow_conn, sandbox, brand_id)
    users = users_frame(random.Random(55), 30)
    _write_users(demo_db, users)
    summary = run_ok(example_dagbag.dags["example_stopchurn_xcom"], 0, task_id="sync_channel_consents")
    assert summary["inserted"] == 60  # one row per user and channel
    rows = sandbox.rows(brand_id, "channelConsent")
    assert {r["id"] for r in rows} == {f"{u}:{c}" for u in users["id"] for c in ("email", "sms")}
    first = next(r for r in rows if r["id"] == "1:email")
    assert first == {"id": "1:email", "userId": 1, "channel": "email", "optedIn": bool(users["marketing_email"][0])}


@pytest.fixture(scope="module")
def example_dagbag(airflow_db: Path) -> Any:
    bag = dag_bag(Path(__file__).parent.parent / "example_dags")
    assert not bag.import_errors
    return bag


# --- options ---------------------------------------------------------------------------------------------------
def test_initial_load_baseline_sends_nothing_then_only_changes(sandbox: SandboxServer, tmp_path: Path) -> None:
    rng = random.Random(66)
    state = {"frame": users_frame(rng, 100)}
    dag = sync_dag(
        "baseline",
        table_name="account",
        dataframe=lambda: state["frame"].copy(),
        initial_load="baseline",
        snapshot_uri=str(tmp_path / "snapshots"),
    )
    first = run_ok(dag, 0)
    assert first["baseline"] is True
    assert (first["inserted"], first["updated"], first["deleted"], first["chunks"]) == (0, 0, 0, 0)
    assert sandbox.stats()["requests"] == 0

    before = state["frame"]
    state["frame"], (n_ins, n_upd, n_del) = mutate(before, rng, ["id"], lambda n: users_frame(rng, n, 5000))
    second = run_ok(dag, 1)
    assert second["baseline"] is False
    assert (second["inserted"], second["updated"], second["deleted"]) == (n_ins, n_upd, n_del)
    assert sandbox.stats()["updates"] == {"insert": n_ins, "update": n_upd, "delete": n_del}
    # Only the changed rows reached StopChurn (the rest came with the historical upload).
    changed_or_new = state["frame"].merge(before, how="left", indicator=True).query("_merge == 'left_only'")
    assert_in_step(sandbox, 1, "account", changed_or_new.drop(columns="_merge"), ["id"])


def test_dry_run_leaves_no_trace(sandbox: SandboxServer, tmp_path: Path) -> None:
    rng = random.Random(77)
    root = tmp_path / "snapshots"
    state = {"frame": users_frame(rng, 90)}
    common = {"table_name": "account", "dataframe": lambda: state["frame"].copy(), "snapshot_uri": str(root)}
    dry = sync_dag("dry", dry_run=True, **common)
    real = sync_dag("real", **common)

    # A dry run on a fresh store: the full plan, but nothing sent and no file written.
    plan = run_ok(dry, 0)
    assert plan["dry_run"] is True
    assert (plan["inserted"], plan["updated"], plan["deleted"]) == (90, 0, 0)
    assert plan["chunks"] >= 1
    assert 1 <= len(plan["samples"]) <= 5
    assert plan["samples"][0]["type"] == "insert"
    assert sandbox.stats()["requests"] == 0
    assert snapshot_files(root) == {}

    # The real run behaves as if the dry run never happened.
    done = run_ok(real, 1)
    assert (done["inserted"], done["chunks"]) == (90, plan["chunks"])
    assert_in_step(sandbox, 1, "account", state["frame"], ["id"])

    state["frame"], counts = mutate(state["frame"], rng, ["id"], lambda n: users_frame(rng, n, 5000))
    files, requests = snapshot_files(root), sandbox.stats()["requests"]
    plan = run_ok(dry, 2)
    assert (plan["inserted"], plan["updated"], plan["deleted"]) == counts
    assert snapshot_files(root) == files
    assert sandbox.stats()["requests"] == requests
    done = run_ok(real, 3)
    assert (done["inserted"], done["updated"], done["deleted"]) == counts
    assert done["chunks"] == plan["chunks"]
    assert_in_step(sandbox, 1, "account", state["frame"], ["id"])


def test_chunks_bounded_by_rows(sandbox: SandboxServer, tmp_path: Path) -> None:
    frame = users_frame(random.Random(88), 50)
    dag = sync_dag(
        "rows",
        table_name="account",
        dataframe=lambda: frame,
        chunk_size=7,
        snapshot_uri=str(tmp_path / "s"),
    )
    summary = run_ok(dag, 0)
    assert summary["chunks"] == summary["requests"] == math.ceil(50 / 7)
    assert sandbox.stats()["accepted_requests"] == math.ceil(50 / 7)
    assert_in_step(sandbox, 1, "account", frame, ["id"])


def test_chunks_bounded_by_bytes(
    stopchurn_sandbox_factory: Callable[..., SandboxServer], airflow_conn: Callable[..., None], tmp_path: Path
) -> None:
    limit = 4_000
    sandbox = stopchurn_sandbox_factory(max_body_bytes=limit)  # answers 413 to any larger body
    airflow_conn("stopchurn_bytes", conn_type="stopchurn", host=sandbox.url, password=sandbox.token)
    frame = users_frame(random.Random(99), 60)
    dag = sync_dag(
        "bytes",
        table_name="account",
        brand_id=7,
        stopchurn_conn_id="stopchurn_bytes",
        dataframe=lambda: frame,
        max_chunk_bytes=limit,
        snapshot_uri=str(tmp_path / "s"),
    )
    summary = run_ok(dag, 0)
    stats = sandbox.stats()
    assert stats["rejected_requests"] == 0
    assert summary["chunks"] == stats["accepted_requests"] > 1
    assert summary["bytes"] > limit * (summary["chunks"] - 1) / 2  # chunks are reasonably full
    assert summary["bytes"] <= limit * summary["chunks"]
    assert_in_step(sandbox, 7, "account", frame, ["id"])


memory_fs = memory_fs_fixture("/stopchurn-e2e")


@pytest.mark.matrix
@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_snapshot_uri(scheme: str, sandbox: SandboxServer, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if scheme == "memory":
        fs = request.getfixturevalue("memory_fs")
        uri = "memory://stopchurn-e2e/snapshots"
    else:
        uri = (tmp_path / "snapshots").as_uri()
    rng = random.Random(123)
    state = {"frame": users_frame(rng, 40)}
    dag = sync_dag("uri", table_name="account", dataframe=lambda: state["frame"].copy(), snapshot_uri=uri)
    first = run_ok(dag, 0)
    assert first["inserted"] == 40
    if scheme == "memory":
        from airflow.sdk import ObjectStoragePath

        expected_location = str(ObjectStoragePath(uri))  # "memory:///stopchurn-e2e/..." on Airflow 3.1
    else:
        expected_location = str(tmp_path / "snapshots")
    assert first["snapshot_uri"] == f"{expected_location}/1/account"

    state["frame"], counts = mutate(state["frame"], rng, ["id"], lambda n: users_frame(rng, n, 5000))
    second = run_ok(dag, 1)  # reads back the snapshot the first run wrote
    assert (second["inserted"], second["updated"], second["deleted"]) == counts
    assert_in_step(sandbox, 1, "account", state["frame"], ["id"])

    if scheme == "memory":
        files = fs.find("/stopchurn-e2e/snapshots")
    else:
        files = [str(p) for p in (tmp_path / "snapshots").rglob("*") if p.is_file()]
    assert any(f.endswith(".parquet") for f in files), files
    assert any("/1/account/" in f for f in files), files


def outage_then_retry_dag(
    sandbox: SandboxServer,
    airflow_conn: Callable[..., None],
    name: str,
    snapshot_root: Path,
    tries: list[int] | None = None,
) -> tuple[DAG, pd.DataFrame]:
    """A DAG whose first try fails after two acknowledged chunks and whose Airflow retry finds the outage over;
    returns it and the 50 users it syncs.

    Sequential chunks of 10: chunks 1-2 acknowledged, chunk 3 and its one HTTP retry answered 500 (the connection,
    brand 1, allows one HTTP retry); the source lifts the faults when the task's second try reads it.

    :param sandbox: the sandbox ``stopchurn_default`` is pointed at.
    :param airflow_conn: the test's ``airflow_conn`` fixture.
    :param name: names the DAG.
    :param snapshot_root: the task's ``snapshot_uri``.
    :param tries: collects the try numbers the source was read in (None: not collected).
    """
    point_stopchurn_default(airflow_conn, sandbox, 1, max_retries=1, timeout=5)
    frame = users_frame(random.Random(9), 50)

    def source(context: Any) -> pd.DataFrame:
        if tries is not None:
            tries.append(context["ti"].try_number)
        if context["ti"].try_number > 1:
            sandbox.set_faults(FaultConfig())  # the outage is over
        return frame

    sandbox.set_faults(FaultConfig(seed=seed_failing_third_request(0.5), error_rate=0.5))
    dag = sync_dag(
        name,
        table_name="account",
        dataframe=source,
        chunk_size=10,
        max_concurrent_requests=1,
        snapshot_uri=str(snapshot_root),
        retries=1,
        retry_delay=timedelta(0),
    )
    return dag, frame


@pytest.mark.matrix
def test_failed_try_is_settled_and_the_retry_sends_the_rest(
    stopchurn_sandbox: SandboxServer, airflow_conn: Callable[..., None], tmp_path: Path
) -> None:
    """A try that fails after two acknowledged chunks (500s until the HTTP retries run out) is a retryable
    failure; Airflow's retry settles what was acknowledged and sends only the rest."""
    sandbox = stopchurn_sandbox
    tries: list[int] = []
    dag, frame = outage_then_retry_dag(sandbox, airflow_conn, "retry", tmp_path / "snapshots", tries)
    summary = run_ok(dag, 0)
    assert tries == [1, 2]
    assert summary["settled_chunks"] == 2  # the first try's acknowledged chunks, committed by the retry
    assert summary["inserted"] == 50  # the whole DAG run's count
    stats = sandbox.stats()
    assert stats["accepted_requests"] == 5  # 2 in the first try, the other 3 in the retry: nothing resent
    assert stats["faults"]["error"] == 2
    assert_in_step(sandbox, 1, "account", frame, ["id"])


@pytest.mark.matrix
def test_summary_in_xcom(sandbox: SandboxServer, tmp_path: Path) -> None:
    frame = users_frame(random.Random(5), 10)
    summary = run_ok(sync_dag("summary", table_name="account", dataframe=lambda: frame, snapshot_uri=str(tmp_path)), 0)
    assert set(summary) >= SUMMARY_KEYS, SUMMARY_KEYS - set(summary)
    assert "samples" not in summary  # only a dry run carries samples
    assert summary["table_name"] == "account"
    assert summary["brand_id"] == 1
    assert summary["dry_run"] is False
    assert summary["requests"] == summary["chunks"] == 1
    assert summary["bytes"] > 0
    assert summary["duration_s"] >= 0
    assert "sandbox-test-key" not in json.dumps(summary)


def test_second_run_of_a_table_waits_for_the_lock(sandbox: SandboxServer, tmp_path: Path) -> None:
    """A run started while another holds the table (e.g. a UI trigger beside the scheduled run) waits for it."""
    import threading
    import time

    from airflow_provider_stopchurn.store import SnapshotStore

    root = tmp_path / "snapshots"
    frame = users_frame(random.Random(7), 20)
    dag = sync_dag("lockwait", table_name="account", dataframe=lambda: frame, snapshot_uri=str(root), lock_wait_s=60)
    held = threading.Event()

    def other_run() -> None:
        with SnapshotStore(root, 1, "account").lock("other_dag.sync run manual"):
            held.set()
            time.sleep(2)

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        assert held.wait(10)
        summary = run_ok(dag, 0)
    finally:
        thread.join(timeout=30)
    assert summary["inserted"] == 20
    assert_in_step(sandbox, 1, "account", frame, ["id"])
