"""The historical export: files in StopChurn's documented upload format, a manifest that matches them, and a
baseline the update engine continues from, so that after an upload only later changes are sent.

The format is checked by a validator written here from the documentation (not by the exporter's code), and the
expected rows are built from the source with pandas' own JSON writer.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers_sync import RecordingSender, make_client

from airflow_provider_stopchurn.exceptions import SafeguardError, SourceDataError
from airflow_provider_stopchurn.export.engine import run_export
from airflow_provider_stopchurn.export.files import MANIFEST
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.export.summary import ExportSummary
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import CREATED_AT, SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

BRAND = 9
TABLE = "account"
T_EXPORT = 1_750_000_000_000
T_LATER = T_EXPORT + 86_400_000


def accounts(n: int, first: int = 1) -> pd.DataFrame:
    ids = np.arange(first, first + n)
    return pd.DataFrame(
        {
            "id": ids,
            "email": [f"user{i}@example.com" for i in ids],
            "plan": [["free", "pro", "team"][i % 3] for i in ids],
            "seats": ids % 17,
            "score": np.where(ids % 5 == 0, np.nan, ids / 4),
            "tags": [{"tier": int(i % 3), "labels": ["a", "é"][: i % 3]} for i in ids],
            "signed_up": pd.to_datetime(1_700_000_000_000 + ids * 1000, unit="ms", utc=True),
        }
    )


def expected_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """What StopChurn should hold for ``frame``: pandas' JSON (NaN as null), UTC datetimes as epoch ms."""
    plain = frame.copy()
    for column in plain.columns:
        if isinstance(plain[column].dtype, pd.DatetimeTZDtype):
            plain[column] = (plain[column] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    return json.loads(plain.to_json(orient="records"))


def validate_file(raw: bytes) -> list[dict[str, Any]]:
    """Check one file against the documented upload format; return its items."""
    items = json.loads(raw)
    assert isinstance(items, list), "a file is one JSON array"
    for item in items:
        assert isinstance(item, dict) and set(item) == {"data", "createdAt", "updatedAt"}, item
        assert isinstance(item["data"], dict) and isinstance(item["data"].get("id"), str | int), item
        for stamp in ("createdAt", "updatedAt"):
            value = item[stamp]
            assert type(value) is int and len(str(value)) == 13, f"{stamp} must be epoch milliseconds: {value!r}"
    return items


def export(tmp_path: Path, source: Any, table: str = TABLE, **kwargs: Any) -> ExportSummary:
    kwargs.setdefault("run_id", "scheduled__2025-06-15T00:00:00+00:00")
    store = SnapshotStore(tmp_path / "snapshots", BRAND, table)
    options = ExportOptions(brand_id=BRAND, table_name=table, **kwargs)
    return run_export(source, store, tmp_path / "export", options, run_ms=T_EXPORT)


def files_of(summary: ExportSummary) -> list[Path]:
    return sorted(Path(summary.output_uri).glob("part-*.json"))


def upload(sb: SandboxServer, path: Path, table: str = TABLE) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{sb.url}/_sandbox/historical/{BRAND}/{table}", data=path.read_bytes(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


# --- the files -------------------------------------------------------------------------------------------------
def test_files_are_the_documented_format_with_every_row_once(tmp_path: Path) -> None:
    frame = accounts(300)
    summary = export(tmp_path, frame)
    folder = Path(summary.output_uri)
    assert folder.parent == tmp_path / "export" / str(BRAND) / TABLE
    assert re.fullmatch(r"20250615T000000Z-scheduled-[0-9a-f]{6}", folder.name), folder.name
    items = [item for path in files_of(summary) for item in validate_file(path.read_bytes())]
    assert [item["data"] for item in items] == expected_rows(frame)
    assert {(item["createdAt"], item["updatedAt"]) for item in items} == {(T_EXPORT, T_EXPORT)}
    assert (summary.rows, summary.files) == (300, 1)


def test_no_file_exceeds_the_limit_and_the_manifest_matches_the_files(tmp_path: Path) -> None:
    limit = 1500
    frame = accounts(250)
    summary = export(tmp_path, frame, max_file_bytes=limit)
    paths = files_of(summary)
    assert len(paths) > 20 and [p.name for p in paths] == [f"part-{i:05d}.json" for i in range(1, len(paths) + 1)]
    sizes = [p.stat().st_size for p in paths]
    assert max(sizes) <= limit
    assert min(sizes[:-1]) > limit * 0.7  # files are filled, not cut early
    manifest = json.loads((Path(summary.output_uri) / MANIFEST).read_text())
    assert manifest["files"] == [
        {
            "name": p.name,
            "rows": len(validate_file(p.read_bytes())),
            "bytes": p.stat().st_size,
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
        for p in paths
    ]
    assert (manifest["rows"], manifest["bytes"], manifest["table_name"], manifest["brand_id"]) == (
        250,
        sum(sizes),
        TABLE,
        BRAND,
    )
    assert manifest["snapshot"]["version"] == summary.snapshot_version
    items = [item for p in paths for item in validate_file(p.read_bytes())]
    assert [item["data"] for item in items] == expected_rows(frame)


def test_a_row_larger_than_a_file_stops_without_manifest_or_baseline(tmp_path: Path) -> None:
    frame = accounts(20)
    frame.loc[12, "email"] = "x" * 2000
    with pytest.raises(SourceDataError, match="id 13"):
        export(tmp_path, frame, max_file_bytes=1000)
    assert not list(tmp_path.glob("export/**/manifest.json"))
    assert SnapshotStore(tmp_path / "snapshots", BRAND, TABLE).read_committed() is None


def test_created_and_updated_at_columns(tmp_path: Path) -> None:
    frame = accounts(5).assign(
        created=pd.to_datetime([1_600_000_000_000 + i for i in range(5)], unit="ms", utc=True),
        modified=[1_650_000_000_000 + i for i in range(5)],
    )
    summary = export(tmp_path, frame, created_at_column="created", updated_at_column="modified")
    items = validate_file(files_of(summary)[0].read_bytes())
    assert [(i["createdAt"], i["updatedAt"]) for i in items] == [
        (1_600_000_000_000 + i, 1_650_000_000_000 + i) for i in range(5)
    ]


def test_the_user_table_contract_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(SourceDataError, match="marketingPreferences"):
        export(tmp_path, accounts(3), table="user")
    assert not (tmp_path / "export").exists()
    users = pd.DataFrame(
        {
            "id": ["a", "b"],
            "marketingPreferences.email": [1, 0],  # 0/1 flags, as SQLite returns them
            "marketingPreferences.phone": [0, 0],
            "systemPreferences.email": [True, True],
            "systemPreferences.phone": [False, True],
        }
    )
    summary = export(tmp_path, users, table="user")
    items = validate_file(files_of(summary)[0].read_bytes())
    assert items[0]["data"] == {
        "id": "a",
        "marketingPreferences": {"email": True, "phone": False},
        "systemPreferences": {"email": True, "phone": False},
    }


def test_an_empty_table_writes_a_manifest_and_an_empty_baseline(tmp_path: Path) -> None:
    summary = export(tmp_path, accounts(0))
    assert (summary.rows, summary.files, files_of(summary)) == (0, 0, [])
    assert json.loads((Path(summary.output_uri) / MANIFEST).read_text())["files"] == []
    committed = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE).read_committed()
    assert committed is not None and committed.rows == 0


# --- the baseline ----------------------------------------------------------------------------------------------
def test_after_the_upload_the_update_run_sends_only_the_changes(
    stopchurn_sandbox: SandboxServer, tmp_path: Path
) -> None:
    before = accounts(400)
    summary = export(tmp_path, before, max_file_bytes=20_000)
    for path in files_of(summary):  # the Back Office upload
        assert upload(stopchurn_sandbox, path)["message"] == "Historical data received"
    assert stopchurn_sandbox.rows(BRAND, TABLE) == expected_rows(before)

    after = before.copy()
    after.loc[after["id"] % 50 == 0, "plan"] = "enterprise"  # 8 updated
    after = after[after["id"] % 97 != 0]  # 4 deleted
    after = pd.concat([after, accounts(5, first=1000)], ignore_index=True)  # 5 inserted
    recorder = RecordingSender(make_client(stopchurn_sandbox))
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    result = run_sync(after, store, recorder, SyncOptions(brand_id=BRAND, table_name=TABLE), run_ms=T_LATER)
    assert (result.inserted, result.updated, result.deleted, result.unchanged) == (5, 8, 4, 388)
    sent = recorder.updates()
    assert len(sent) == 17
    # a row that existed at the export keeps the createdAt the file gave it
    updated = [u for u in sent if u["type"] == "update"]
    assert {u["data"]["createdAt"] for u in updated} == {T_EXPORT}
    assert {u["data"]["updatedAt"] for u in sent} == {T_LATER}
    assert sorted(stopchurn_sandbox.rows(BRAND, TABLE), key=lambda r: r["id"]) == sorted(
        expected_rows(after), key=lambda r: r["id"]
    )


def test_the_baseline_holds_the_files_created_at(tmp_path: Path) -> None:
    frame = accounts(10).assign(created=[1_600_000_000_000 + 7 * i for i in range(10)])
    summary = export(tmp_path, frame, created_at_column="created")
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    committed = store.read_committed()
    assert committed is not None and committed.version == summary.snapshot_version
    snap = committed.frame
    by_id = dict(zip(snap["id"].to_list(), snap[CREATED_AT].to_list(), strict=True))
    items = validate_file(files_of(summary)[0].read_bytes())
    assert by_id == {i["data"]["id"]: i["createdAt"] for i in items}


def test_an_existing_snapshot_is_not_replaced_unless_told(stopchurn_sandbox: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    run_sync(accounts(10), store, make_client(stopchurn_sandbox), SyncOptions(brand_id=BRAND, table_name=TABLE))
    version = store.read_committed().version
    with pytest.raises(SafeguardError, match="replace_snapshot=True") as info:
        export(tmp_path, accounts(12))
    first, *details = str(info.value).splitlines()
    assert len(first) < 120 and "replace_snapshot=True" in first, first  # the fix, on the line a log viewer shows
    assert details and any(store.location in line for line in details)
    assert store.read_committed().version == version and not (tmp_path / "export").exists()
    summary = export(tmp_path, accounts(12), replace_snapshot=True)
    assert summary.replaced_snapshot and store.read_committed().version == summary.snapshot_version
    assert store.read_committed().rows == 12


def test_a_retry_of_the_same_run_rewrites_its_own_export(tmp_path: Path) -> None:
    first = export(tmp_path, accounts(30), max_file_bytes=1000, run_key="dag.export run r1")
    stale = files_of(first)
    second = export(tmp_path, accounts(30), max_file_bytes=5000, run_key="dag.export run r1")  # the task's retry
    assert not second.replaced_snapshot and second.files < len(stale)
    assert files_of(second) == stale[: second.files]  # the earlier try's extra files are gone
    with pytest.raises(SafeguardError):
        export(tmp_path, accounts(30), run_key="dag.export run r2")  # another run is not this export


# --- the sandbox's upload route -----------------------------------------------------------------------------------
GOOD = {"data": {"id": 1, "x": "a"}, "createdAt": T_EXPORT, "updatedAt": T_EXPORT}
BAD_FILES = [
    ({"a": 1}, "must be a JSON array"),
    ([GOOD, "x"], "[1] must be an object"),
    ([GOOD, {"data": {"id": 2}, "createdAt": T_EXPORT}], "[1] lacks updatedAt"),
    ([GOOD, {**GOOD, "brandId": 1}], "unknown field(s): brandId"),
    ([GOOD, {**GOOD, "data": [1]}], "[1].data (the row) must be an object"),
    ([GOOD, {**GOOD, "data": {"x": 1}}], "[1].data.id must be a string or a number"),
    ([GOOD, {**GOOD, "data": {"id": True}}], "[1].data.id"),
    ([GOOD, {**GOOD, "data": {"id": 2}, "createdAt": T_EXPORT // 1000}], "epoch in milliseconds"),
    ([GOOD, {**GOOD, "data": {"id": 2}, "updatedAt": "2025-01-01"}], "[1].updatedAt"),
    ([GOOD, GOOD], "appears twice"),
]


@pytest.mark.parametrize(("content", "reason"), BAD_FILES)
def test_sandbox_refuses_a_malformed_upload_whole(stopchurn_sandbox: SandboxServer, content: Any, reason: str) -> None:
    request = urllib.request.Request(
        f"{stopchurn_sandbox.url}/_sandbox/historical/{BRAND}/{TABLE}", data=json.dumps(content).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    message = json.loads(caught.value.read())["message"]
    assert message.startswith("Historical upload failed: ") and reason in message
    assert stopchurn_sandbox.rows(BRAND, TABLE) == []


def test_sandbox_upload_upserts_rows_and_counts_them(stopchurn_sandbox: SandboxServer, tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "data": {"id": "1", "x": "b"}}]))
    assert upload(stopchurn_sandbox, path) == {"statusCode": 200, "message": "Historical data received", "rows": 2}
    path.write_text(json.dumps([{**GOOD, "data": {"id": 1, "x": "c"}}]))
    upload(stopchurn_sandbox, path)
    assert stopchurn_sandbox.rows(BRAND, TABLE) == [{"id": 1, "x": "c"}, {"id": "1", "x": "b"}]
    assert stopchurn_sandbox.stats()["historical"] == {"files": 2, "rows": 3}


def test_files_do_not_depend_on_the_workers_time_zone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = accounts(20).assign(
        naive=pd.to_datetime(1_700_000_000_000 + np.arange(20) * 3_600_000, unit="ms"),
        day=pd.to_datetime("2024-03-31").date(),
    )
    written = {}
    try:
        for zone in ("UTC", "Europe/Paris", "America/St_Johns"):
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            summary = export(tmp_path / zone, frame, run_id="r")
            written[zone] = b"".join(p.read_bytes() for p in files_of(summary))
    finally:
        monkeypatch.undo()  # the process's own zone back, for the tests after this one
        time.tzset()
    assert written["UTC"] == written["Europe/Paris"] == written["America/St_Johns"]
    first = validate_file(written["UTC"])[0]["data"]
    assert first["naive"] == 1_700_000_000_000 and first["day"] == 1_711_843_200_000  # naive values taken as UTC


def test_an_update_run_in_another_shape_than_the_export_is_a_schema_change(tmp_path: Path) -> None:
    # the files carried nested objects; an update run that would send the same rows flat must not go unseen
    dotted = pd.DataFrame({"id": [1, 2], "prefs.email": [True, False]})
    export(tmp_path, dotted, nest_dotted_columns=True)
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    assert (store.read_current() or {}).get("shape") == {"nest_dotted_columns": True}
    flat = SyncOptions(brand_id=BRAND, table_name=TABLE, nest_dotted_columns=False)
    with pytest.raises(SafeguardError, match="nest_dotted_columns"):
        run_sync(dotted, store, RecordingSender(None), flat, run_ms=T_LATER)


# --- the export folder's name -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("run_id", "name"),
    [
        ("manual__2026-12-07T00:52:12.345678+00:00", r"20261207T005212Z-manual-[0-9a-f]{6}"),
        ("scheduled__2025-06-15T00:00:00+00:00", r"20250615T000000Z-scheduled-[0-9a-f]{6}"),
        ("backfill__2025-06-15T02:00:00+02:00", r"20250615T000000Z-backfill-[0-9a-f]{6}"),  # in UTC
        ("asset_triggered__2025-06-15T00:00:00.5+00:00", r"20250615T000000Z-asset_triggered-[0-9a-f]{6}"),
        ("my run: onboarding/brand 7", r"my-run-onboarding-brand-7-[0-9a-f]{6}"),
        ("r", r"r-[0-9a-f]{6}"),
        ("..", r"run-[0-9a-f]{6}"),
    ],
)
def test_the_export_folder_is_named_so_a_person_can_type_it(run_id: str, name: str) -> None:
    """No percent-escapes: a UTC time (or the run id's safe characters) and a short hash of the whole run id."""
    from airflow_provider_stopchurn.export.folder import export_folder_name

    folder = export_folder_name(run_id)
    assert re.fullmatch(name, folder), folder
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", folder) and folder not in {".", ".."}
    assert export_folder_name(run_id) == folder  # every try of one DAG run writes the same folder


def test_two_runs_in_the_same_second_get_their_own_folders() -> None:
    from airflow_provider_stopchurn.export.folder import export_folder_name

    first = export_folder_name("manual__2026-12-07T00:52:12.100000+00:00")
    second = export_folder_name("manual__2026-12-07T00:52:12.200000+00:00")
    assert first != second and first[:16] == second[:16] == "20261207T005212Z"
