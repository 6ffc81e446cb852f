"""StopChurnUpdateOperator on its own: constructor checks, templating declarations, brand id resolution, and
how engine errors become Airflow errors (``execute()`` called directly, against the sandbox)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from airflow.sdk import DAG, task
from airflow_plugin import point_stopchurn_default

from airflow_provider_stopchurn.hooks._compat import AirflowException, AirflowFailException
from airflow_provider_stopchurn.operators.commit_guard import (
    CommitRecord,
    SnapshotBehindError,
    legacy_record_key,
    other_location_message,
    record_key,
    stale_snapshot_message,
)
from airflow_provider_stopchurn.operators.stopchurn import RETRY_DEFAULTS, StopChurnUpdateOperator
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer

FRAME = pd.DataFrame({"id": [1, 2, 3], "name": ["a", "b", "c"]})
CONTEXT: dict[str, Any] = {"run_id": "manual__unit", "ti": None}

#: Runs on every supported Airflow version (make test-matrix): the errors the task runner sees differ by release.
pytestmark = pytest.mark.matrix


def _op(**kwargs: Any) -> StopChurnUpdateOperator:
    kwargs.setdefault("task_id", "sync")
    kwargs.setdefault("table_name", "account")
    return StopChurnUpdateOperator(**kwargs)


def _explode() -> pd.DataFrame:
    raise AssertionError("the source callable must not be called at DAG parse time")


# --- constructor -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of `dataframe` or `sql`"),
        ({"dataframe": FRAME, "sql": "SELECT 1", "sql_conn_id": "db"}, "exactly one of `dataframe` or `sql`"),
        ({"sql": "SELECT 1"}, "`sql` needs `sql_conn_id`"),
        ({"dataframe": FRAME, "initial_load": "everything"}, "initial_load must be 'send' or 'baseline'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _op(**kwargs)


def test_template_fields() -> None:
    fields = set(StopChurnUpdateOperator.template_fields)
    assert {"table_name", "brand_id", "sql", "parameters", "snapshot_uri", "dataframe"} <= fields
    assert {"allow_large_changes", "accept_missing_snapshot"} <= fields  # one run can approve them
    assert "stopchurn_conn_id" not in fields  # a connection id is not a template
    assert ".sql" in StopChurnUpdateOperator.template_ext


def test_constructor_does_no_io_and_calls_nothing() -> None:
    with DAG("unit_parse", schedule=None) as dag:
        op = _op(dataframe=_explode, stopchurn_conn_id="does_not_exist", snapshot_uri="s3://nowhere/at-all")
    assert dag.task_dict["sync"] is op
    assert op.dataframe is None  # the callable is kept out of the template fields: the renderer would call it
    assert op.primary_key == ["id"]


def test_primary_key_list() -> None:
    assert _op(dataframe=FRAME, primary_key=("tenant", "code")).primary_key == ["tenant", "code"]


def test_xcom_arg_stays_in_the_template_field() -> None:
    with DAG("unit_xcom", schedule=None):

        @task
        def build() -> pd.DataFrame:
            return FRAME

        frame = build()
        op = _op(dataframe=frame)
    assert op.dataframe is frame
    assert [t.task_id for t in op.upstream_list] == ["build"]


# --- execute ---------------------------------------------------------------------------------------------------
def _conn(airflow_conn: Any, sandbox: SandboxServer, conn_id: str = "stopchurn_default", **extra: Any) -> None:
    airflow_conn(conn_id, conn_type="stopchurn", host=sandbox.url, password=sandbox.token, extra=extra)


def test_brand_id_from_connection(stopchurn_conn: SandboxServer, tmp_path: Path) -> None:
    summary = _op(dataframe=FRAME, snapshot_uri=str(tmp_path)).execute(CONTEXT)
    assert summary["brand_id"] == 1
    assert [r["id"] for r in stopchurn_conn.rows(1, "account")] == [1, 2, 3]


def test_brand_id_argument_wins(stopchurn_conn: SandboxServer, tmp_path: Path) -> None:
    summary = _op(dataframe=FRAME, brand_id="42", snapshot_uri=str(tmp_path)).execute(CONTEXT)
    assert summary["brand_id"] == 42
    assert len(stopchurn_conn.rows(42, "account")) == 3
    assert stopchurn_conn.rows(1, "account") == []


def test_no_brand_id_anywhere(stopchurn_sandbox: SandboxServer, airflow_conn: Any, tmp_path: Path) -> None:
    _conn(airflow_conn, stopchurn_sandbox, "stopchurn_nobrand")
    op = _op(dataframe=FRAME, stopchurn_conn_id="stopchurn_nobrand", snapshot_uri=str(tmp_path))
    with pytest.raises(AirflowFailException, match=r"No brand id.*brand_id.*stopchurn_nobrand"):
        op.execute(CONTEXT)
    assert stopchurn_sandbox.stats()["requests"] == 0


def test_callable_receives_context(stopchurn_conn: SandboxServer, tmp_path: Path) -> None:
    seen: list[Any] = []

    def source(context: Any) -> pd.DataFrame:
        seen.append(context["run_id"])
        return FRAME

    _op(dataframe=source, snapshot_uri=str(tmp_path)).execute(CONTEXT)
    assert seen == ["manual__unit"]


def test_wrong_api_key_is_permanent(stopchurn_sandbox: SandboxServer, airflow_conn: Any, tmp_path: Path) -> None:
    point_stopchurn_default(airflow_conn, stopchurn_sandbox, 1, password="wrong-key")
    with pytest.raises(AirflowFailException) as info:
        _op(dataframe=FRAME, snapshot_uri=str(tmp_path)).execute(CONTEXT)
    assert "wrong-key" not in str(info.value)
    assert stopchurn_sandbox.stats()["unauthorized"] == 1  # a 401 is not retried


def test_rejected_request_is_permanent(stopchurn_conn: SandboxServer, tmp_path: Path) -> None:
    stopchurn_conn.reject_ids({2})
    with pytest.raises(AirflowFailException, match="rejected"):
        _op(dataframe=FRAME, snapshot_uri=str(tmp_path)).execute(CONTEXT)


def test_bad_source_data_is_permanent(stopchurn_conn: SandboxServer, tmp_path: Path) -> None:
    duplicated = pd.DataFrame({"id": [1, 1], "name": ["a", "b"]})
    with pytest.raises(AirflowFailException):
        _op(dataframe=duplicated, snapshot_uri=str(tmp_path)).execute(CONTEXT)
    assert stopchurn_conn.stats()["requests"] == 0


def test_source_that_is_not_a_frame_is_permanent(stopchurn_conn: SandboxServer, tmp_path: Path) -> None:
    with pytest.raises(AirflowFailException, match="DataFrame"):
        _op(dataframe=lambda: [{"id": 1}], snapshot_uri=str(tmp_path)).execute(CONTEXT)


def test_server_errors_are_transient_and_the_next_try_delivers(
    stopchurn_sandbox: SandboxServer, airflow_conn: Any, tmp_path: Path
) -> None:
    """500 on every request: HTTP retries (max_retries from the connection) run out -> AirflowException, which
    Airflow may retry; once the server recovers, the next try sends the changes again and commits them."""
    _conn(airflow_conn, stopchurn_sandbox, brand_id=1, max_retries=1, timeout=5)
    stopchurn_sandbox.set_faults(FaultConfig(error_rate=1.0))
    op = _op(dataframe=FRAME, snapshot_uri=str(tmp_path), chunk_size=2, max_concurrent_requests=1)
    with pytest.raises(AirflowException) as info:
        op.execute(CONTEXT)
    assert not isinstance(info.value, AirflowFailException)
    assert stopchurn_sandbox.stats()["requests"] == 2  # one attempt + one retry, then the run stops

    stopchurn_sandbox.set_faults(FaultConfig())
    summary = op.execute(CONTEXT)
    assert summary["settled_chunks"] == 0  # the failed try had nothing acknowledged
    assert (summary["inserted"], summary["updated"], summary["deleted"]) == (3, 0, 0)
    assert [r["id"] for r in stopchurn_sandbox.rows(1, "account")] == [1, 2, 3]


def test_mass_delete_safeguard_is_permanent(stopchurn_conn: SandboxServer, tmp_path: Path) -> None:
    _op(dataframe=FRAME, snapshot_uri=str(tmp_path)).execute(CONTEXT)
    with pytest.raises(AirflowFailException, match="max_delete_fraction") as info:
        _op(dataframe=FRAME.head(1), snapshot_uri=str(tmp_path)).execute(CONTEXT)
    first, *details = str(info.value).splitlines()
    assert first == "The plan deletes 2 of 3 rows (66.7%) of brand 1 table 'account'; nothing was sent."
    # how to approve it from the UI, in Airflow 3.3's words (one Trigger button, its dialog's Run Parameters)
    assert "press Trigger and switch on approve_mass_delete under Run Parameters" in details[-1]
    assert "w/ config" not in details[-1]
    summary = _op(dataframe=FRAME.head(1), snapshot_uri=str(tmp_path), allow_large_changes="True").execute(CONTEXT)
    assert summary["deleted"] == 2


@pytest.mark.parametrize("form", ["as_uri", "localhost"])
def test_file_uri_snapshot_location(stopchurn_conn: SandboxServer, tmp_path: Path, form: str) -> None:
    """A ``file://`` URL names the same folder as its path, percent-escapes and a ``localhost`` host included."""
    folder = tmp_path / "snap shots"
    uri = folder.as_uri() if form == "as_uri" else f"file://localhost{folder.as_posix()}"
    summary = _op(dataframe=FRAME, snapshot_uri=uri).execute(CONTEXT)
    assert summary["snapshot_uri"] == f"{folder}/1/account"
    assert any(p.suffix == ".parquet" for p in folder.rglob("*"))


def test_file_uri_on_another_host_is_refused(stopchurn_conn: SandboxServer) -> None:
    with pytest.raises(AirflowFailException, match="remote host"):
        _op(dataframe=FRAME, snapshot_uri="file://fileserver/share/snapshots").execute(CONTEXT)
    assert stopchurn_conn.stats()["requests"] == 0


# --- the multi-worker guard (pure parts; end to end in test_multi_worker_guard.py) --------------------------------
RECORD = CommitRecord(
    version="20250102T030405000000Z-aaaaaaaa",
    rows=120,
    location="s3://bucket/stopchurn/1/account",
    written_by="nightly.sync run scheduled__2025-01-02",
)
KEY = "stopchurn_commit__1__account__0123456789abcdef"


@pytest.mark.parametrize(
    ("found", "rows", "expected"),
    [
        ("20250102T030405000000Z-aaaaaaaa", 120, None),  # the recorded snapshot
        ("20250103T000000000000Z-bbbbbbbb", 125, None),  # a newer one (committed after the record was written)
        (None, None, "finds no snapshot there"),
        ("20250101T235959999999Z-ffffffff", 100, "finds an older snapshot 20250101T235959999999Z-ffffffff (100 rows)"),
        ("20250102T030405000000Z-0aaaaaaa", None, "finds an older snapshot 20250102T030405000000Z-0aaaaaaa there"),
    ],
)
def test_stale_snapshot_message(found: str | None, rows: int | None, expected: str | None) -> None:
    message = stale_snapshot_message(RECORD, found, rows, key=KEY)
    if expected is None:
        assert message is None
        return
    assert message is not None
    assert expected in message
    assert "Airflow recorded that snapshot 20250102T030405000000Z-aaaaaaaa (120 rows) was committed at " in message
    assert "s3://bucket/stopchurn/1/account by nightly.sync run scheduled__2025-01-02" in message
    assert "Nothing was sent." in message
    assert message.splitlines()[0] == "This worker's snapshot store is behind what Airflow recorded. Nothing was sent."
    assert "several workers" in message
    assert "snapshot_uri=" in message
    assert "snapshot_conn_id=" in message
    assert "accept_missing_snapshot=True" in message
    assert f"delete the Airflow Variable {KEY!r}" in message


def test_snapshot_behind_is_permanent() -> None:
    assert SnapshotBehindError("x").permanent is True


@pytest.mark.parametrize("table", ["account", "user", "a.b", "naïve table/with:odd*chars", "x" * 300])
def test_record_key_is_a_valid_variable_key(table: str) -> None:
    from airflow.utils.helpers import validate_key

    for key in (record_key(42, table), legacy_record_key(42, table, f"/srv/snapshots/42/{table}")):
        validate_key(key)  # letters, digits, _ - . only; at most 250 characters; no ".."
        assert key.startswith("stopchurn_commit__42__")


def test_record_key_is_per_brand_and_table_whatever_the_location() -> None:
    keys = {record_key(1, "account"), record_key(2, "account"), record_key(1, "user"), record_key(1, "a.b")}
    assert len(keys | {record_key(1, "a_b")}) == 5  # names that read alike stay apart
    assert record_key(1, "account") == record_key(1, "account")
    # the key of earlier releases depended on the location too
    assert legacy_record_key(1, "account", "/a/1/account") != legacy_record_key(1, "account", "s3://b/1/account")


def test_other_location_message_names_both_locations_and_the_way_to_move() -> None:
    message = other_location_message(RECORD, "/srv/snapshots/1/account", key=KEY, table="Brand 1 table 'account'")
    assert message.splitlines()[0] == (
        "Brand 1 table 'account' is synced through a snapshot store at another location. Nothing was read or sent."
    )
    assert "s3://bucket/stopchurn/1/account by nightly.sync run" in message
    assert "/srv/snapshots/1/account" in message and "move_store_from" in message
    assert "delete the snapshot" not in message


def test_commit_record_json() -> None:
    assert CommitRecord.from_json(RECORD.to_json()) == RECORD
    assert CommitRecord.from_json('{"version": "v1", "rows": true}').rows is None
    for bad in ("[]", "{}", '{"version": ""}', '{"version": 3}', "not json"):
        with pytest.raises(ValueError):
            CommitRecord.from_json(bad)


def test_execute_outside_a_task_skips_the_guard(stopchurn_conn: SandboxServer, tmp_path: Path) -> None:
    """Without a running task instance there is no Airflow record to read or write: the run is the engine's."""
    root = tmp_path / "snapshots"
    _op(dataframe=FRAME, snapshot_uri=str(root)).execute(CONTEXT)
    shutil.rmtree(root)  # as if on another worker
    summary = _op(dataframe=FRAME, snapshot_uri=str(root)).execute(CONTEXT)
    assert summary["inserted"] == 3  # a first load again: nothing recorded the first run


def test_operator_arguments_mirror_sync_options() -> None:
    """Every option passed through takes the operator argument of the same name and the same default."""
    import dataclasses
    import inspect

    from airflow_provider_stopchurn.operators.stopchurn import SYNC_OPTION_ARGUMENTS, StopChurnUpdateOperator
    from airflow_provider_stopchurn.options import SyncOptions

    params = inspect.signature(StopChurnUpdateOperator.__init__).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(SyncOptions)}
    assert SYNC_OPTION_ARGUMENTS, "no option is passed through"
    for name in SYNC_OPTION_ARGUMENTS:
        assert name in params, name
        assert params[name].default == defaults[name], (name, params[name].default, defaults[name])
    assert params["dry_run"].default == defaults["dry_run"]
    assert params["allow_large_changes"].default == defaults["allow_large_changes"]


# --- task retries ------------------------------------------------------------------------------------------------
def test_retries_by_default() -> None:
    """A retry settles what the failed try delivered and sends the rest: the operator retries unless told not to."""
    from datetime import timedelta

    op = _op(dataframe=FRAME)
    backoff = RETRY_DEFAULTS["retry_exponential_backoff"]  # 2.0 (a multiplier) on Airflow 3.2+, True before
    assert backoff == (True if isinstance(backoff, bool) else 2.0)
    assert (op.retries, op.retry_delay, op.retry_exponential_backoff) == (3, timedelta(minutes=2), backoff)


@pytest.mark.parametrize(
    ("dag_default_args", "task_kwargs", "expected"),
    [
        ({"retries": 0}, {}, (0, 300.0, 0)),  # the DAG's default_args win, Airflow's delay with them
        ({"retries": 5, "retry_delay": 10}, {}, (5, 10.0, 0)),
        ({}, {"retries": 1}, (1, 300.0, 0)),  # the task's own arguments win
        ({"retry_delay": 30}, {}, (3, 30.0, RETRY_DEFAULTS["retry_exponential_backoff"])),  # the rest: defaults
        ({"retry_exponential_backoff": False}, {}, (3, 120.0, False)),
    ],
)
def test_dag_and_task_retry_settings_win(
    dag_default_args: dict[str, Any], task_kwargs: dict[str, Any], expected: tuple[int, float, float]
) -> None:
    with DAG("retry_defaults", schedule=None, default_args=dag_default_args):
        op = _op(dataframe=FRAME, **task_kwargs)
    assert (op.retries, op.retry_delay.total_seconds(), op.retry_exponential_backoff) == expected


def test_operator_default_args_win_too() -> None:
    assert _op(dataframe=FRAME, default_args={"retries": 0}).retries == 0
