"""The order in which an operator refuses its arguments at DAG parse time: its own checks (a choice, a schema, the
event's name, the lookback) come before the arguments the three operators share are copied, so a DAG with two
mistakes is told the one it always was, and an operator's error does not depend on its base class."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from airflow_provider_stopchurn.operators.stopchurn import StopChurnEventOperator, StopChurnUpdateOperator

#: a ``json_columns`` that is no sequence of names: copying it fails (TypeError), after the operator's own checks
NOT_NAMES: Any = None

UPDATE = {"table_name": "t", "sql": "SELECT 1 AS id", "sql_conn_id": "db", "json_columns": NOT_NAMES}
EVENT = {"user_id_column": "id", "sql": "SELECT 1 AS id", "sql_conn_id": "db", "json_columns": NOT_NAMES}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"initial_load": "later"}, "initial_load must be 'send' or 'baseline', got 'later'"),
        ({"state_schema": " "}, "state_schema must be a schema name, got ' '"),
    ],
    ids=["initial_load", "state_schema"],
)
def test_update_operator_names_its_own_bad_argument_first(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StopChurnUpdateOperator(task_id="update", **UPDATE, **arguments)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "pass exactly one of `name` or `name_column`"),
        ({"name": "n", "value_column": "v", "value_columns": ["w"]}, "pass at most one of `value_column`"),
        ({"name": "n", "lookback": datetime.timedelta(days=10**6)}, "`lookback` must be at most"),
    ],
    ids=["name", "value_columns", "lookback"],
)
def test_event_operator_names_its_own_bad_argument_first(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StopChurnEventOperator(task_id="events", **EVENT, **arguments)
