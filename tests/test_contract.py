"""StopChurn's ``user`` table contract, checked on canonical frames (as the engine does before sending)."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import pandas as pd
import polars as pl
import pytest

from airflow_provider_stopchurn.api.contract import check_user_table
from airflow_provider_stopchurn.encode.records import encode_rows
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.frame import canonicalize


def canonical(rows: list[dict[str, Any]] | pd.DataFrame, key: str = "id") -> Any:
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return canonicalize(frame, key_columns=[key])


def check(rows: list[dict[str, Any]] | pd.DataFrame, **kwargs: Any) -> None:
    canon = canonical(rows)
    check_user_table(canon.frame, canon.kinds, **kwargs)


def dotted(uid: Any, m_email: Any = True, m_phone: Any = False, s_email: Any = True, s_phone: Any = True) -> dict:
    return {
        "id": uid,
        "email": f"u{uid}@example.com",
        "marketingPreferences.email": m_email,
        "marketingPreferences.phone": m_phone,
        "systemPreferences.email": s_email,
        "systemPreferences.phone": s_phone,
    }


_DEFAULT: Any = object()


def nested(uid: Any, marketing: Any = _DEFAULT, system: Any = _DEFAULT) -> dict:
    return {
        "id": uid,
        "marketingPreferences": {"email": True, "phone": False} if marketing is _DEFAULT else marketing,
        "systemPreferences": {"email": False, "phone": True, "extra": [1]} if system is _DEFAULT else system,
    }


# --- accepted ------------------------------------------------------------------------------------------------
def test_dotted_boolean_columns_are_accepted_and_encode_as_objects() -> None:
    canon = canonical([dotted(1), dotted(2, False, True, False, False)])
    check_user_table(canon.frame, canon.kinds)
    row = json.loads(encode_rows(canon.frame, canon.kinds)[0])
    assert row["marketingPreferences"] == {"email": True, "phone": False}
    assert row["systemPreferences"] == {"email": True, "phone": True}


def test_json_object_columns_are_accepted() -> None:
    check([nested(1), nested(2, system={"phone": False, "email": True})])


def test_one_object_of_each_form_is_accepted() -> None:
    rows = [{**dotted(1), "systemPreferences": {"email": True, "phone": True}}]
    for row in rows:
        del row["systemPreferences.email"], row["systemPreferences.phone"]
    check(rows)


def test_keyword_call_and_empty_frame_are_accepted() -> None:
    canon = canonical(
        pd.DataFrame([dotted(1)]).iloc[:0].astype({"id": "int64"} | {c: "boolean" for c in dotted(1) if "." in c})
    )
    check_user_table(frame=canon.frame, kinds=canon.kinds)


def test_string_ids_and_a_separate_key_column_are_accepted() -> None:
    rows = [{**dotted(f"user-{n}"), "pk": n} for n in range(3)]
    canon = canonicalize(pd.DataFrame(rows), key_columns=["pk"])
    check_user_table(canon.frame, canon.kinds)


# --- refused -------------------------------------------------------------------------------------------------
def refused(rows: list[dict[str, Any]] | pd.DataFrame, **kwargs: Any) -> str:
    with pytest.raises(SourceDataError) as info:
        check(rows, **kwargs)
    return str(info.value)


def test_missing_object_is_refused_naming_both_forms() -> None:
    rows = [dotted(1)]
    del rows[0]["systemPreferences.email"], rows[0]["systemPreferences.phone"]
    message = refused(rows)
    assert "'systemPreferences' is missing" in message
    assert "'systemPreferences.email' and 'systemPreferences.phone'" in message
    assert "Nothing was sent" in message


def test_missing_one_dotted_field_is_refused() -> None:
    rows = [dotted(1)]
    del rows[0]["marketingPreferences.phone"]
    assert "column 'marketingPreferences.phone' is missing" in refused(rows)


def test_null_booleans_are_refused_with_example_ids() -> None:
    rows = [dotted(n, m_email=None if n % 2 else True) for n in range(1, 21)]
    message = refused(rows)
    assert "10 row(s) have a null 'marketingPreferences.email'" in message
    assert message.endswith("Example row ids: 1, 3, 5, 7, 9.")


def test_integer_flags_are_refused_with_a_hint() -> None:
    rows = [dotted(1, m_email=1, m_phone=0)]
    message = refused(rows)
    assert "'marketingPreferences.email' has kind 'int', not 'bool'" in message
    assert "astype(bool)" in message


def test_string_flags_are_refused() -> None:
    assert "has kind 'string', not 'bool'" in refused([dotted(1, s_phone="true")])


@pytest.mark.parametrize(
    "bad",
    [
        {"email": True},  # phone missing
        {"email": True, "phone": None},
        {"email": "true", "phone": False},  # a string is not a boolean
        {"email": 1, "phone": 0},
        {"email": [True], "phone": True},
        {"email": {"value": True}, "phone": True},
        {"nested": {"email": True, "phone": True}},  # only deeper down
        [True, False],
        "yes",
        None,
    ],
    ids=lambda bad: re.sub(r"\W+", "-", json.dumps(bad)).strip("-") or "null",
)
def test_malformed_json_objects_are_refused(bad: Any) -> None:
    rows = [nested(1), nested(2, marketing=bad), nested(3)]
    if isinstance(bad, str):  # a column of strings and dicts is still a json column
        rows[0]["marketingPreferences"] = {"email": True, "phone": True}
    message = refused(rows)
    assert "1 row(s) have a 'marketingPreferences' that is not an object with boolean email and phone" in message
    assert message.endswith("Example row ids: 2.")


def test_string_boolean_beside_valid_rows_only_flags_its_row() -> None:
    rows = [nested(n) for n in range(1, 6)]
    rows[3]["systemPreferences"] = {"email": True, "phone": "false", "note": {"email": "true"}}
    message = refused(rows)
    assert "1 row(s) have a 'systemPreferences'" in message
    assert message.endswith("Example row ids: 4.")


def test_json_text_column_is_refused_with_a_hint() -> None:
    rows = [{**dotted(1), "systemPreferences": '{"email": true, "phone": true}'}]
    del rows[0]["systemPreferences.email"], rows[0]["systemPreferences.phone"]
    message = refused(rows)
    assert "column 'systemPreferences' has kind 'string'" in message
    assert "parse it into objects" in message


def test_dotted_columns_do_not_count_without_nesting() -> None:
    message = refused([dotted(1)], nest_dotted_columns=False)
    assert "'marketingPreferences' is missing: give a JSON column" in message


def test_all_problems_are_listed_at_once() -> None:
    rows = [dotted(n, m_email=None, s_phone=None) for n in range(1, 4)]
    message = refused(rows)
    assert "3 row(s) have a null 'marketingPreferences.email'" in message
    assert "3 row(s) have a null 'systemPreferences.phone'" in message
    assert message.endswith("Example row ids: 1, 2, 3.")


def test_null_id_is_refused() -> None:
    # canonicalize refuses a null id over the whole table already; the contract also checks frames built otherwise
    source = pd.DataFrame([{**dotted(None), "pk": 1}, {**dotted("u7"), "pk": 2}])
    with pytest.raises(SourceDataError, match=r"Column 'id' has 1 missing value\(s\).*key 1"):
        canonicalize(source, key_columns=["pk"])
    canon = canonicalize(source.assign(id=["placeholder", "u7"]), key_columns=["pk"])
    frame = canon.frame.with_columns(pl.when(pl.col("pk") == 1).then(None).otherwise(pl.col("id")).alias("id"))
    with pytest.raises(SourceDataError, match=r"1 row\(s\) have a null 'id'"):
        check_user_table(frame, canon.kinds)


def test_module_imports_no_airflow() -> None:
    assert "airflow_provider_stopchurn.api.contract" in sys.modules
    code = (
        "import sys; import airflow_provider_stopchurn.api.contract, airflow_provider_stopchurn.source.sql; "
        "assert not any(m == 'airflow' or m.startswith('airflow.') for m in sys.modules)"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)
