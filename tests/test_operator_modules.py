"""The operators' layout: one module per operator, one source-reading path, the old import path kept."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pandas as pd
import pytest
from airflow.sdk import DAG

from airflow_provider_stopchurn.hooks._compat import BaseOperator
from airflow_provider_stopchurn.operators import stopchurn
from airflow_provider_stopchurn.operators.stopchurn import (
    StopChurnEventOperator,
    StopChurnHistoricalExportOperator,
    StopChurnUpdateOperator,
)

OPERATORS = (StopChurnUpdateOperator, StopChurnEventOperator, StopChurnHistoricalExportOperator)
OPERATORS_FOLDER = Path(stopchurn.__file__).resolve().parent
MAX_LINES = 500


def _operator_classes(module_name: str) -> list[str]:
    module = sys.modules[module_name]
    return sorted(
        name
        for name, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, BaseOperator) and value.__module__ == module_name
    )


def test_each_operator_has_a_module_of_its_own() -> None:
    modules = [operator.__module__ for operator in OPERATORS]
    assert len(set(modules)) == len(OPERATORS), modules
    for operator in OPERATORS:
        assert _operator_classes(operator.__module__) == [operator.__name__]


@pytest.mark.parametrize("path", sorted(OPERATORS_FOLDER.glob("*.py")), ids=lambda p: p.name)
def test_operator_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines"


def test_the_old_path_names_the_same_objects() -> None:
    for name in ("RETRY_DEFAULTS", "SYNC_OPTION_ARGUMENTS", "_SourceArguments", "run_info", "read_sql"):
        assert hasattr(stopchurn, name)
    for operator in OPERATORS:
        assert getattr(stopchurn, operator.__name__) is operator
        assert operator.__module__ != stopchurn.__name__
        assert getattr(sys.modules[operator.__module__], operator.__name__) is operator


def test_the_three_operators_read_their_source_one_way() -> None:
    for method in ("_set_source", "_source", "_read"):
        functions = {getattr(operator, method) for operator in OPERATORS}
        assert len(functions) == 1, method
        (function,) = functions
        assert function.__qualname__ == f"_SourceArguments.{method}"


def test_a_callable_source_is_read_alike_by_the_three() -> None:
    frame = pd.DataFrame({"id": [1, 2]})
    seen: list[object] = []

    def produce(context: object) -> pd.DataFrame:
        seen.append(context)
        return frame

    context = {"run_id": "r1"}
    with DAG("source_reading", schedule=None):
        update = StopChurnUpdateOperator(task_id="u", table_name="t", brand_id=1, dataframe=produce)
        events = StopChurnEventOperator(task_id="e", name="n", user_id_column="id", brand_id=1, dataframe=produce)
        export = StopChurnHistoricalExportOperator(task_id="x", table_name="t", brand_id=1, dataframe=produce)
    for task in (update, events, export):
        assert task._source(context)() is frame  # type: ignore[arg-type]
    assert seen == [context, context, context]
