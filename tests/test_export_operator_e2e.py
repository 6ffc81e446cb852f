"""StopChurnHistoricalExportOperator end to end through ``dag.test()``: onboarding a brand with the example DAGs.

The onboarding DAG exports the ``users`` table, the files are uploaded into the sandbox (as the Back Office
would take them), and the nightly update DAG then sends only what changed after the export.
"""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pendulum
import pytest
from airflow.sdk import DAG
from airflow_plugin import point_stopchurn_default, run_dag, task_states, xcom_return
from leak_scan import Captured, files_text
from operator_fixtures import brand_fixture, memory_fs_fixture, sandbox_fixture

from airflow_provider_stopchurn.operators.stopchurn import StopChurnHistoricalExportOperator
from airflow_provider_stopchurn.sandbox import SandboxServer

pytestmark = pytest.mark.usefixtures("airflow_db")

START = pendulum.datetime(2025, 1, 1, tz="UTC")
EXAMPLE_DAGS = Path(__file__).resolve().parent.parent / "example_dags"
_ids = itertools.count(1)


brand = brand_fixture(500)
sandbox = sandbox_fixture()


@pytest.fixture
def demo_db(tmp_path: Path, airflow_conn: Callable[..., None]) -> Path:
    path = tmp_path / "app.db"
    airflow_conn("stopchurn_demo_db", conn_type="sqlite", host=str(path))
    return path


def users(rng: random.Random, ids: range) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": list(ids),
            "email": [f"user{i}@example.com" for i in ids],
            "first_name": [rng.choice(["Ana", "Ben", "Chloé"]) for _ in ids],
            "last_name": [rng.choice(["Ng", None]) for _ in ids],
            "status": [rng.choice(["active", "paused"]) for _ in ids],
            "signed_up_at": [1_700_000_000_000 + i for i in ids],
            "marketing_email": [rng.randint(0, 1) for _ in ids],
            "marketing_sms": [rng.randint(0, 1) for _ in ids],
            "system_email": [1 for _ in ids],
            "system_sms": [rng.randint(0, 1) for _ in ids],
        }
    )


def write(path: Path, frame: pd.DataFrame) -> None:
    with sqlite3.connect(path) as conn:
        frame.to_sql("users", conn, if_exists="replace", index=False)


def stopchurn_rows(path: Path) -> list[dict[str, Any]]:
    """The ``user`` rows StopChurn should hold: the DAG's query, dotted aliases nested, 0/1 flags as booleans."""
    with sqlite3.connect(path) as conn:
        cursor = conn.execute((EXAMPLE_DAGS / "sql" / "users.sql").read_text())
        names = [d[0] for d in cursor.description]
        rows = []
        for values in cursor:
            row: dict[str, Any] = {}
            for name, value in zip(names, values, strict=True):
                head, _, tail = name.partition(".")
                if tail:
                    row.setdefault(head, {})[tail] = bool(value)
                else:
                    row[name] = value
            rows.append(row)
    return sorted(rows, key=lambda r: r["id"])


def upload(sb: SandboxServer, brand: int, table: str, data: bytes) -> None:
    request = urllib.request.Request(f"{sb.url}/_sandbox/historical/{brand}/{table}", data=data, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["statusCode"] == 200


@pytest.fixture(scope="module")
def example_dagbag(airflow_db: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(EXAMPLE_DAGS))
    assert not bag.import_errors
    return bag


def run_ok(dag: Any, day: int, task_id: str) -> dict[str, Any]:
    dagrun = run_dag(dag, logical_date=START.add(days=day))
    assert str(dagrun.state) == "success", task_states(dagrun)
    summary = xcom_return(dagrun, task_id)
    assert isinstance(summary, dict)
    return summary


def test_onboarding_export_upload_then_the_nightly_run_sends_only_changes(
    sandbox: SandboxServer, brand: int, demo_db: Path, example_dagbag: Any
) -> None:
    rng = random.Random(7)
    frame = users(rng, range(1, 301))
    write(demo_db, frame)
    exported = run_ok(example_dagbag.dags["example_stopchurn_onboarding"], 0, "export_users")
    assert (exported["rows"], exported["brand_id"], exported["table_name"]) == (300, brand, "user")
    folder = Path(exported["output_uri"])
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:  # the Back Office upload
        upload(sandbox, brand, "user", (folder / entry["name"]).read_bytes())
    assert sandbox.rows(brand, "user") == stopchurn_rows(demo_db)
    assert sandbox.stats()["requests"] == 0  # the export sent nothing to the API

    ids = frame["id"]
    updated = int(((ids % 25 == 0) & (ids % 60 != 0)).sum())  # 11: ids 25, 50, ... 275, not 300 (deleted)
    changed = frame.copy()
    changed.loc[changed["id"] % 25 == 0, "status"] = "cancelled"  # a status no user had
    changed = changed[changed["id"] % 60 != 0]  # 5 deleted
    changed = pd.concat([changed, users(rng, range(1000, 1004))], ignore_index=True)  # 4 inserted
    write(demo_db, changed)
    nightly = run_ok(example_dagbag.dags["example_stopchurn_sql_nightly"], 1, "sync_users")
    assert (nightly["inserted"], nightly["updated"], nightly["deleted"]) == (4, updated, 5)
    assert nightly["baseline"] is False and nightly["unchanged"] == 300 - 5 - updated
    assert sandbox.stats()["updates"] == {"insert": 4, "update": nightly["updated"], "delete": 5}
    assert sandbox.rows(brand, "user") == stopchurn_rows(demo_db)


def test_a_second_export_is_refused_without_replace_snapshot(
    sandbox: SandboxServer, brand: int, demo_db: Path, tmp_path: Path
) -> None:
    write(demo_db, users(random.Random(1), range(1, 11)))
    common = {
        "table_name": "user",
        "sql": "sql/users.sql",
        "sql_conn_id": "stopchurn_demo_db",
        "output_uri": str(tmp_path / "out"),
        "snapshot_uri": str(tmp_path / "snapshots"),
    }
    with DAG(
        f"export_twice_{next(_ids)}",
        schedule=None,
        start_date=START,
        template_searchpath=str(EXAMPLE_DAGS),
        params={"replace": False},
    ) as dag:
        StopChurnHistoricalExportOperator(task_id="export", replace_snapshot="{{ params.replace }}", **common)
    run_ok(dag, 0, "export")
    again = run_dag(dag, logical_date=START.add(days=1))
    assert task_states(again) == {"export": "failed"}
    replaced = run_dag(dag, logical_date=START.add(days=2), run_conf={"replace": True})
    assert str(replaced.state) == "success"
    assert xcom_return(replaced, "export")["replaced_snapshot"] is True


memory_fs = memory_fs_fixture("/stopchurn-export-e2e")


def test_export_to_an_object_store(sandbox: SandboxServer, brand: int, tmp_path: Path, memory_fs: Any) -> None:
    frame = pd.DataFrame({"id": range(1, 201), "name": [f"n{i}" * 5 for i in range(1, 201)]})
    with DAG(f"export_memory_{next(_ids)}", schedule=None, start_date=START) as dag:
        StopChurnHistoricalExportOperator(
            task_id="export",
            table_name="account",
            dataframe=lambda: frame,
            output_uri="memory://stopchurn-export-e2e/exports",
            snapshot_uri=str(tmp_path / "snapshots"),
            max_file_bytes=4000,
        )
    summary = run_ok(dag, 0, "export")
    assert summary["output_uri"].startswith(f"memory://stopchurn-export-e2e/exports/{brand}/account/")
    names = sorted(p.rsplit("/", 1)[-1] for p in memory_fs.find("/stopchurn-export-e2e"))
    assert summary["files"] > 3
    assert names == ["manifest.json", *(f"part-{i:05d}.json" for i in range(1, summary["files"] + 1))]
    rows = []
    for path in sorted(memory_fs.find("/stopchurn-export-e2e")):
        if path.endswith(".json") and "part-" in path:
            assert memory_fs.size(path) <= 4000
            rows += [item["data"] for item in json.loads(memory_fs.cat(path))]
    assert rows == frame.to_dict(orient="records")


KEY = "sk-EXPORT-LEAKCHECK-9a8b7c6d5e"


@pytest.mark.parametrize("replace", [True, False])
def test_the_key_never_appears_in_the_exports_logs_xcom_or_files(
    replace: bool,
    stopchurn_sandbox_factory: Callable[..., SandboxServer],
    airflow_conn: Callable[..., None],
    tmp_path: Path,
    captured: Captured,
) -> None:
    """A successful export over an existing snapshot (replace) and a refused one: every logger at DEBUG."""
    sb = stopchurn_sandbox_factory(token=KEY)
    point_stopchurn_default(airflow_conn, sb, 3)
    frame = pd.DataFrame({"id": range(1, 41), "name": [f"n{i}" for i in range(1, 41)]})
    with DAG(f"export_secrets_{next(_ids)}", schedule=None, start_date=START, params={"replace": replace}) as dag:
        StopChurnHistoricalExportOperator(
            task_id="export",
            table_name="account",
            dataframe=lambda: frame,
            output_uri=str(tmp_path / "out"),
            snapshot_uri=str(tmp_path / "snapshots"),
            replace_snapshot="{{ params.replace }}",
        )
    captured.start()
    run_ok(dag, 0, "export")
    second = run_dag(dag, logical_date=START.add(days=1))
    assert str(second.state) == ("success" if replace else "failed")
    printed = captured.printed()
    records = captured.records()
    files = files_text(tmp_path)
    outputs = json.dumps(xcom_return(second, "export"), default=str) if replace else ""
    assert records and files  # the scan is not vacuous
    for where, text in {
        "log records": records,
        "stdout": printed.out,
        "stderr": printed.err,
        "xcom": outputs,
        "files": files,
    }.items():
        assert KEY not in text, f"the API key leaked into {where}"
    assert sb.stats()["requests"] == 0  # the export sends nothing to StopChurn


def test_the_onboarding_example_replaces_a_snapshot_only_when_approved_by_param(
    sandbox: SandboxServer, brand: int, demo_db: Path, example_dagbag: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    """A second export is refused with one short first line naming the fix; the Trigger dialog's
    ``approve_replace_snapshot`` then approves one run. Each run's folder is named so a person can type it."""
    import re

    dag = example_dagbag.dags["example_stopchurn_onboarding"]
    write(demo_db, users(random.Random(3), range(1, 21)))
    first = run_ok(dag, 0, "export_users")
    capfd.readouterr()
    refused = run_dag(dag, logical_date=START.add(days=1))
    assert task_states(refused) == {"export_users": "failed"}  # a refusal is not retried
    printed = capfd.readouterr().out
    first_lines = {ln[ln.index("Export refused:") :] for ln in printed.splitlines() if "Export refused:" in ln}
    assert first_lines, printed[-2000:]
    for first_line in first_lines:  # the log's and the traceback's: the same short line, naming the fix
        assert len(first_line) < 120 and "replace_snapshot=True" in first_line, first_line
    replaced = run_dag(dag, logical_date=START.add(days=2), run_conf={"approve_replace_snapshot": True})
    assert str(replaced.state) == "success", task_states(replaced)
    summary = xcom_return(replaced, "export_users")
    assert summary["replaced_snapshot"] is True and summary["rows"] == 20
    for folder in (Path(first["output_uri"]), Path(summary["output_uri"])):
        assert re.fullmatch(r"\d{8}T\d{6}Z-[a-z_]+-[0-9a-f]{6}", folder.name), folder.name
        assert (folder / "manifest.json").exists()
    assert Path(first["output_uri"]) != Path(summary["output_uri"])
