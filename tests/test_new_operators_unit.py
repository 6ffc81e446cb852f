"""StopChurnEventOperator and StopChurnHistoricalExportOperator on their own: constructor checks, templating,
no work at DAG parse time, and arguments that cannot drift from the engine's options."""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import socket
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from airflow.sdk import DAG

from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.operators.stopchurn import (
    RETRY_DEFAULTS,
    StopChurnEventOperator,
    StopChurnHistoricalExportOperator,
    StopChurnUpdateOperator,
)
from airflow_provider_stopchurn.options import LOCK_TTL_S

FRAME = pd.DataFrame({"id": [1], "user_id": [2]})


def _explode() -> pd.DataFrame:
    raise AssertionError("the source callable must not be called at DAG parse time")


def _event(**kwargs: Any) -> StopChurnEventOperator:
    kwargs.setdefault("task_id", "send")
    kwargs.setdefault("user_id_column", "user_id")
    return StopChurnEventOperator(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "X"}, "exactly one of `dataframe` or `sql`"),
        ({"name": "X", "sql": "SELECT 1"}, "`sql` needs `sql_conn_id`"),
        ({"dataframe": FRAME}, "exactly one of `name` or `name_column`"),
        ({"dataframe": FRAME, "name": "X", "name_column": "n"}, "exactly one of `name` or `name_column`"),
        ({"dataframe": FRAME, "name": "X", "value_column": "a", "value_columns": ["b"]}, "at most one"),
    ],
)
def test_event_constructor_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _event(**kwargs)


def test_export_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one of `dataframe` or `sql`"):
        StopChurnHistoricalExportOperator(task_id="export", table_name="user")


def test_template_fields() -> None:
    assert {"brand_id", "name", "sql", "parameters", "state_uri", "dataframe", "stream_id"} <= set(
        StopChurnEventOperator.template_fields
    )
    assert {"table_name", "brand_id", "sql", "output_uri", "snapshot_uri", "replace_snapshot"} <= set(
        StopChurnHistoricalExportOperator.template_fields
    )
    for op in (StopChurnEventOperator, StopChurnHistoricalExportOperator):
        assert ".sql" in op.template_ext
        assert not {"stopchurn_conn_id", "state_conn_id", "output_conn_id"} & set(op.template_fields)


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


def test_event_arguments_cover_the_engine_options() -> None:
    derived = {"brand_id", "holder", "run_key", "progress_interval_s", "run_info"}
    fields = {f.name for f in dataclasses.fields(EventOptions)} - derived
    assert fields <= _parameters(StopChurnEventOperator)


def test_export_arguments_cover_the_engine_options() -> None:
    derived = {"brand_id", "holder", "run_key", "run_id", "key_columns", "run_info"}
    fields = {f.name for f in dataclasses.fields(ExportOptions)} - derived
    assert fields <= _parameters(StopChurnHistoricalExportOperator)
    assert "primary_key" in _parameters(StopChurnHistoricalExportOperator)


def test_constructors_do_no_io_and_call_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an operator constructor opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(tmp_path)
    with DAG("unit_new_ops", schedule=None):
        event = _event(
            dataframe=_explode,
            name="X",
            event_key="id",
            lookback=dt.timedelta(hours=1),
            watermark_column="t",
            state_uri="s3://nowhere/at-all",
            stopchurn_conn_id="does_not_exist",
        )
        export = StopChurnHistoricalExportOperator(
            task_id="export",
            table_name="user",
            dataframe=_explode,
            output_uri="s3://nowhere/else",
            snapshot_uri="s3://nowhere/at-all",
        )
    assert event.dataframe is None and export.dataframe is None  # callables stay out of the template fields
    assert event.event_key == ["id"] and export.primary_key == ["id"]
    assert list(tmp_path.iterdir()) == []


# --- the lock wait and the task retries, as the update operator's --------------------------------------------------
def _export(**kwargs: Any) -> StopChurnHistoricalExportOperator:
    kwargs.setdefault("task_id", "export")
    kwargs.setdefault("table_name", "user")
    kwargs.setdefault("dataframe", FRAME)
    return StopChurnHistoricalExportOperator(**kwargs)


def _event_op(**kwargs: Any) -> StopChurnEventOperator:
    kwargs.setdefault("dataframe", FRAME)
    kwargs.setdefault("name", "DEPOSIT")
    return _event(**kwargs)


@pytest.mark.parametrize("make", [_event_op, _export], ids=["events", "export"])
def test_lock_wait_and_retries_default_as_the_update_operators(make: Any) -> None:
    """Two runs of one stream or table started together (a trigger beside the scheduled run): the second waits
    for the lock, and a try that still fails is retried, as the update operator's."""
    from airflow_provider_stopchurn.operators.stopchurn import RETRY_DEFAULTS, StopChurnUpdateOperator

    update = inspect.signature(StopChurnUpdateOperator.__init__).parameters["lock_wait_s"].default
    assert inspect.signature(type(make()).__init__).parameters["lock_wait_s"].default == update == 300.0
    op = make()
    assert op.lock_wait_s == 300.0
    expected = (RETRY_DEFAULTS["retries"], RETRY_DEFAULTS["retry_delay"], RETRY_DEFAULTS["retry_exponential_backoff"])
    assert (op.retries, op.retry_delay, op.retry_exponential_backoff) == expected
    assert op.retries == 3 and op.retry_delay == dt.timedelta(minutes=2)


@pytest.mark.parametrize("make", [_event_op, _export], ids=["events", "export"])
def test_explicit_retries_win_over_the_defaults(make: Any) -> None:
    assert make(retries=0).retries == 0
    assert make(default_args={"retries": 0}).retries == 0
    with DAG("retry_defaults_new_operators", schedule=None, default_args={"retries": 0}):
        assert make().retries == 0
    with DAG("retry_defaults_new_operators_delay", schedule=None, default_args={"retry_delay": 30}):
        op = make()
    assert (op.retries, op.retry_delay.total_seconds()) == (3, 30.0)


def test_the_event_operator_passes_lock_wait_s_to_the_engine() -> None:
    assert "lock_wait_s" in {f.name for f in dataclasses.fields(EventOptions)}
    with pytest.raises(ValueError, match="lock_wait_s"):
        EventOptions(brand_id=1, user_id_column="user_id", name="X", lock_wait_s=-1)


@pytest.mark.parametrize("cls", [StopChurnUpdateOperator, StopChurnEventOperator, StopChurnHistoricalExportOperator])
def test_every_operator_takes_the_lease_and_defaults_it_to_a_quarter_of_an_hour(cls: type) -> None:
    """A run killed on another machine blocks its table until the lease ends: the default retries must outlast it."""
    parameter = inspect.signature(cls.__init__).parameters["lock_ttl_s"]
    assert parameter.default == LOCK_TTL_S == 900.0
    delays = [RETRY_DEFAULTS["retry_delay"].total_seconds() * 2**n for n in range(RETRY_DEFAULTS["retries"])]
    lock_wait_s = inspect.signature(cls.__init__).parameters["lock_wait_s"].default
    waited = sum(delays) + RETRY_DEFAULTS["retries"] * lock_wait_s
    assert waited > LOCK_TTL_S


@pytest.mark.parametrize("value", [0, -5, 86_401, True, "900"])
def test_event_and_export_options_refuse_a_bad_lease(value: Any) -> None:
    with pytest.raises(ValueError, match="lock_ttl_s"):
        EventOptions(brand_id=1, user_id_column="user_id", name="X", lock_ttl_s=value)
    with pytest.raises(ValueError, match="lock_ttl_s"):
        ExportOptions(brand_id=1, table_name="t", lock_ttl_s=value)
