"""``stopchurn reconcile``: the repair of a table diffed in the warehouse whose state table and snapshot store
disagree, on real DuckDB files (``--duckdb``, or an Airflow connection with ``--sql-conn-id``).

Each test makes the drift the way it happens (a state table dropped, the store restored from an older copy or
lost), sees a real run stop with ``StateDriftError``, repairs it with the command, and checks that the next runs
keep StopChurn (the sandbox) equal to the source. Runs use the engine's API (``run_warehouse_sync``); nothing of
the project is mocked.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
from helpers_sync import (
    BRAND,
    T0,
    TABLE,
    Churn,
    assert_sandbox_matches,
    change_counts,
    expected_rows,
    make_client,
    options,
    update_requests,
)

from airflow_provider_stopchurn import cli
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import SyncSummary
from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, StateDriftError, WarehouseSource, run_warehouse_sync

STATE = "stopchurn_state.b7_subscription"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


@dataclass
class World:
    """A DuckDB warehouse file, a snapshot store and the sandbox; ``run`` is one sync in the warehouse."""

    db: Path
    root: Path
    sb: SandboxServer
    churn: Churn
    capsys: pytest.CaptureFixture[str]
    tick: int = 0

    @property
    def store(self) -> SnapshotStore:
        return SnapshotStore(self.root, BRAND, TABLE)

    def load(self, frame: pd.DataFrame) -> pd.DataFrame:
        with duckdb.connect(str(self.db)) as con:
            con.register("frame_in", frame)
            con.execute("CREATE OR REPLACE TABLE src AS SELECT * FROM frame_in")
        return frame

    def run(self, **opts: Any) -> SyncSummary:
        self.tick += 1
        source = WarehouseSource("SELECT * FROM src", DuckDBWarehouse(str(self.db)))
        opts.setdefault("chunk_size", 30)
        return run_warehouse_sync(source, self.store, make_client(self.sb), options(**opts), run_ms=T0 + self.tick)

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        with duckdb.connect(str(self.db)) as con:
            return con.execute(statement).fetchall()

    def tables(self) -> set[str]:
        rows = self.sql("SELECT table_schema || '.' || table_name FROM information_schema.tables")
        return {r[0] for r in rows}

    def reconcile(self, *more: str, warehouse: tuple[str, ...] | None = None) -> Result:
        self.capsys.readouterr()
        where = ("--duckdb", str(self.db)) if warehouse is None else warehouse
        code = cli.main(["reconcile", str(self.root), "--brand", str(BRAND), "--table", TABLE, *where, *more])
        out, err = self.capsys.readouterr()
        return Result(code, out, err)


@pytest.fixture
def world(stopchurn_sandbox_factory: Callable[..., SandboxServer], tmp_path: Path, capsys: Any) -> World:
    return World(
        tmp_path / "warehouse.duckdb",
        tmp_path / "snapshots",
        stopchurn_sandbox_factory(),
        Churn(5, 120, with_json=False),
        capsys,
    )


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text))


def _reconcile_options() -> set[str]:
    parser = cli.build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s for action in commands.choices["reconcile"]._actions for s in action.option_strings}


class _Terminal(io.StringIO):
    """A stdin that is a terminal, with the person's answer already typed."""

    def isatty(self) -> bool:
        return True


# --- drift, repaired ---------------------------------------------------------------------------------------------
def test_reset_after_a_lost_state_table_then_a_baseline_run(world: World) -> None:
    frame = world.load(world.churn.frame)
    world.run()
    assert_sandbox_matches(world.sb, frame)
    world.sql(f"DROP TABLE {STATE}__meta")  # e.g. a cleanup job in the warehouse
    with pytest.raises(StateDriftError, match="stopchurn reconcile") as drift:
        world.run()
    assert (
        {"--adopt-state", "--reset"} <= _flags(str(drift.value)) <= _reconcile_options()
    )  # the message names the command's own flags

    result = world.reconcile("--reset", "--yes", "--json").json()
    assert result["changed"] and result["action"] == "reset" and result["state_token"] is None
    assert result["store_version"] is not None and result["commit_record"].startswith(f"stopchurn_commit__{BRAND}__")
    assert "initial_load='baseline'" in result["message"] and "accept_missing_snapshot=True" in result["message"]
    assert world.store.read_current() is None
    assert not {t for t in world.tables() if t.startswith("stopchurn_state.")}

    requests = update_requests(world.sb)
    baseline = world.run(initial_load="baseline")  # StopChurn holds the table: record it, send nothing
    assert baseline.baseline and update_requests(world.sb) == requests
    old = expected_rows(frame)
    frame = world.load(world.churn.step())
    summary = world.run()
    assert (summary.inserted, summary.updated, summary.deleted) == change_counts(old, expected_rows(frame))
    assert_sandbox_matches(world.sb, frame)


def test_adopt_state_after_the_store_was_restored_from_an_older_copy(world: World, tmp_path: Path) -> None:
    world.load(world.churn.frame)
    world.run()
    shutil.copytree(world.root, tmp_path / "backup")
    frame = world.load(world.churn.step())
    world.run()  # the state table and the store move on together ...
    shutil.rmtree(world.root)
    shutil.copytree(tmp_path / "backup", world.root)  # ... then the store is restored from the backup
    with pytest.raises(StateDriftError, match="was last written with token"):
        world.run()

    (token,) = world.sql(f"SELECT token FROM {STATE}__meta")[0]
    text = world.reconcile("--adopt-state", "--yes")
    assert text.code == 0, text.err
    assert f"token {token}" in text.out and "as delivered" in text.out
    current = world.store.read_current()
    assert current is not None and current["version"] == token and current["rows"] == len(frame)

    old = expected_rows(frame)
    frame = world.load(world.churn.step())
    summary = world.run()  # only the changes since the state table's run are sent
    assert (summary.inserted, summary.updated, summary.deleted) == change_counts(old, expected_rows(frame))
    assert_sandbox_matches(world.sb, frame)
    again = world.reconcile("--adopt-state", "--yes", "--json").json()
    assert again["changed"] is False and "nothing to do" in again["message"]


def test_adopt_state_older_than_the_store_resends_what_it_lacks(world: World, tmp_path: Path) -> None:
    """The warehouse restored from a backup: adopting its older state table resends the changes made since."""
    world.load(world.churn.frame)
    world.run()
    shutil.copy(world.db, tmp_path / "backup.duckdb")
    world.load(world.churn.step())
    world.run()
    shutil.copy(tmp_path / "backup.duckdb", world.db)
    with pytest.raises(StateDriftError, match="was last written with token"):
        world.run()
    result = world.reconcile("--adopt-state", "--yes", "--json").json()
    assert result["state_token"] < result["store_version"]
    assert "older than the store's record" in result["message"] and "accept_missing_snapshot=True" in result["message"]
    frame = world.load(world.churn.step())
    world.run()
    assert_sandbox_matches(world.sb, frame)


def test_adopt_state_when_the_store_was_lost(world: World) -> None:
    frame = world.load(world.churn.frame)
    world.run()
    shutil.rmtree(world.root)
    with pytest.raises(StateDriftError, match="has no record"):
        world.run()
    result = world.reconcile("--adopt-state", "--key-columns", "id", "--yes", "--json").json()
    assert result["changed"] and result["store_version"] is None and result["state_rows"] == len(frame)
    old = expected_rows(frame)
    frame = world.load(world.churn.step())
    summary = world.run()
    assert (summary.inserted, summary.updated, summary.deleted) == change_counts(old, expected_rows(frame))
    assert_sandbox_matches(world.sb, frame)


def test_reset_switches_a_worker_diffed_table_to_the_warehouse(world: World) -> None:
    """The message of a warehouse run over a worker snapshot names reset; the reset then lets it start."""
    from airflow_provider_stopchurn.exceptions import StopChurnConfigError
    from airflow_provider_stopchurn.update.sync import run_sync

    frame = world.load(world.churn.frame)
    run_sync(frame, world.store, make_client(world.sb), options(), run_ms=T0)
    with pytest.raises(StopChurnConfigError, match="stopchurn reconcile --reset") as refused:
        world.run()
    assert _flags(str(refused.value)) <= _reconcile_options()
    preview = world.reconcile("--reset", "--yes")
    assert preview.code == 0, preview.err
    requests = update_requests(world.sb)
    assert world.run(initial_load="baseline").baseline
    assert update_requests(world.sb) == requests
    old = expected_rows(frame)
    frame = world.load(world.churn.step())
    world.run()
    assert change_counts(old, expected_rows(frame)) != (0, 0, 0)
    assert_sandbox_matches(world.sb, frame)


# --- confirmation, usage and errors ------------------------------------------------------------------------------
def test_confirmation_on_a_terminal_and_without_one(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.load(world.churn.frame)
    world.run()
    version = world.store.read_current()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    no_tty = world.reconcile("--reset")
    assert no_tty.code == cli.USAGE and "pass --yes" in no_tty.err
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    declined = world.reconcile("--reset")
    assert declined.code == cli.ERROR and "nothing was changed" in declined.err
    assert f"drop the state table {STATE}" in declined.err and "Drop both? [y/N]" in declined.err  # the preview
    assert world.store.read_current() == version and f"{STATE}__meta" in world.tables()
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    accepted = world.reconcile("--reset")
    assert accepted.code == 0 and f"Dropped {STATE}" in accepted.out
    assert world.store.read_current() is None


@pytest.mark.parametrize(
    ("more", "warehouse", "code", "message"),
    [
        ((), None, cli.USAGE, "exactly one of --adopt-state or --reset"),
        (("--adopt-state", "--reset"), None, cli.USAGE, "exactly one of --adopt-state or --reset"),
        (("--reset",), (), cli.USAGE, "exactly one of --sql-conn-id ID or --duckdb PATH"),
        (("--reset",), ("--duckdb", "x.duckdb", "--sql-conn-id", "db"), cli.USAGE, "exactly one of --sql-conn-id"),
        (("--reset", "--state-schema", " "), None, cli.USAGE, "--state-schema is empty"),
        (("--adopt-state", "--yes"), None, cli.ERROR, "bookkeeping row): nothing to adopt; use --reset"),
        (("--adopt-state", "--key-columns", "region,num", "--yes"), None, cli.ERROR, "keyed by ['id']"),
    ],
)
def test_usage_and_refusals_change_nothing(
    world: World, more: tuple[str, ...], warehouse: tuple[str, ...] | None, code: int, message: str
) -> None:
    world.load(world.churn.frame)
    if "--key-columns" in more:
        world.run()
    before = (world.store.read_current(), world.tables())
    result = world.reconcile(*more, warehouse=warehouse)
    assert result.code == code, result.err
    assert message in result.err and result.err.count("\n") == 1 and result.out == ""
    assert (world.store.read_current(), world.tables()) == before


def test_settle_and_rebaseline_refuse_a_table_diffed_in_the_warehouse(world: World, tmp_path: Path) -> None:
    """They work on the worker's snapshot: on a warehouse table they would drop its pending plan unsettled."""
    frame = world.load(world.churn.frame)
    world.run()
    current = world.store.read_current()
    assert current is not None
    # what a baseline run leaves when it dies before its swap: the plan, and a half-written ..__next table
    world.store.write_plan(
        target_version="29990101T000000-000000000000",
        base_version=current["version"],
        changes=None,
        chunks=[],
        meta={"plan_format": "warehouse-1", "diff_location": "warehouse", "brand_id": BRAND, "table_name": TABLE,
              "baseline": True},
    )  # fmt: skip
    world.sql(f"CREATE TABLE {STATE}__next AS SELECT * FROM {STATE} LIMIT 3")
    table = [str(world.root), "--brand", str(BRAND), "--table", TABLE, "--yes"]
    for command, more, repair in [
        ("settle", (), "its next run settles the pending plan"),
        ("rebaseline", ("--parquet", str(tmp_path / "x.parquet")), "stopchurn reconcile --reset"),
    ]:
        world.capsys.readouterr()
        assert cli.main([command, *table, *more]) == cli.ERROR
        err = world.capsys.readouterr().err
        assert "is diffed in the warehouse" in err and repair in err
        assert world.store.pending_plan(cleanup=False) is not None
    summary = world.run()  # the run settles the plan (the swap never happened: dropped) and diffs as usual
    assert (summary.inserted, summary.updated, summary.deleted) == (0, 0, 0)
    assert world.store.pending_plan(cleanup=False) is None and f"{STATE}__next" not in world.tables()
    assert_sandbox_matches(world.sb, frame)


def test_a_missing_duckdb_file_is_not_created(world: World, tmp_path: Path) -> None:
    result = world.reconcile("--reset", "--yes", warehouse=("--duckdb", str(tmp_path / "typo.duckdb")))
    assert result.code == cli.ERROR and "no DuckDB database at" in result.err
    assert not (tmp_path / "typo.duckdb").exists()


def test_sql_conn_id_resolves_the_warehouse_through_airflow(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = world.load(world.churn.frame)
    world.run()
    world.sql(f"DROP TABLE {STATE}")
    world.sql(f"DROP TABLE {STATE}__meta")
    monkeypatch.setenv("AIRFLOW_CONN_PUSHDOWN_CLI_DUCK", json.dumps({"conn_type": "duckdb", "host": str(world.db)}))
    result = world.reconcile("--reset", "--yes", "--json", warehouse=("--sql-conn-id", "pushdown_cli_duck")).json()
    assert result["warehouse"] == "connection 'pushdown_cli_duck'" and result["changed"]
    world.run(initial_load="baseline")
    old = expected_rows(frame)
    frame = world.load(world.churn.step())
    world.run()
    assert change_counts(old, expected_rows(frame)) != (0, 0, 0)
    assert_sandbox_matches(world.sb, frame)

    monkeypatch.setenv("AIRFLOW_CONN_PUSHDOWN_CLI_LITE", json.dumps({"conn_type": "sqlite", "host": "/nowhere.db"}))
    refused = world.reconcile("--reset", "--yes", warehouse=("--sql-conn-id", "pushdown_cli_lite"))
    assert refused.code == cli.ERROR and "SQLite has no MD5 function" in refused.err


def test_reconcile_with_duckdb_imports_no_airflow(world: World) -> None:
    world.load(world.churn.frame)
    world.run()
    code = (
        "import json, sys\n"
        "from airflow_provider_stopchurn import cli\n"
        "argv = ['reconcile', sys.argv[1], '--brand', sys.argv[2], '--table', sys.argv[3], '--duckdb', sys.argv[4]]\n"
        "code = cli.main([*argv, '--reset', '--yes', '--json'])\n"
        "leaked = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
        "print(json.dumps({'code': code, 'leaked': leaked}), file=sys.stderr)\n"
    )
    argv = [str(world.root), str(BRAND), TABLE, str(world.db)]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == {"code": 0, "leaked": []}, proc.stderr
    assert json.loads(proc.stdout)["changed"] is True
    assert world.store.read_current() is None


def test_reconcile_is_listed() -> None:
    assert "reconcile" in cli.COMMANDS
    assert {"--adopt-state", "--reset", "--duckdb", "--sql-conn-id", "--state-schema", "--key-columns", "--yes"} <= (
        _reconcile_options()
    )


def test_airflow_stopchurn_reconcile(world: World) -> None:
    """The same command through Airflow's own CLI (``airflow stopchurn reconcile``)."""
    world.load(world.churn.frame)
    world.run()
    argv = [str(world.root), "--brand", str(BRAND), "--table", TABLE, "--duckdb", str(world.db), "--reset", "--yes"]
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "stopchurn", "reconcile", *argv, "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["changed"] is True
    assert world.store.read_current() is None
