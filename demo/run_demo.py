"""The StopChurn provider in one command: two nightly syncs of a SQLite ``users`` table to a local StopChurn.

What it does, all under ``.demo/`` (recreated on every run):

1. an Airflow home with a SQLite metadata DB (``airflow db migrate``);
2. a source database ``app.db`` with a ``users`` table of 200 rows and a ``deposits`` table of 500 (fixed seed;
   ``deposits`` is what the events example ``example_stopchurn_events`` reads);
3. the StopChurn sandbox (``python -m airflow_provider_stopchurn.sandbox``) on a free port;
4. ``airflow dags test example_stopchurn_sql_nightly 2025-01-01``: the first run inserts every row;
5. some users are updated, added and deleted in the source;
6. ``airflow dags test ... 2025-01-02``: the second run sends only those changes;
7. StopChurn's ``user`` table, read back from the sandbox, is compared with the source;
8. onboarding a second brand: ``example_stopchurn_onboarding`` writes the table as historical-upload files and
   records them as the baseline, the files are uploaded into the sandbox (as StopChurn's Back Office takes them),
   the source changes, and the nightly DAG's run for that brand sends only those changes.
9. how to see the runs on the StopChurn page of the Airflow UI is printed.

The script drives the ``airflow`` CLI of the interpreter that runs it; it never imports Airflow itself.
Everything it started is stopped when it ends, whatever happens. Run it with ``make demo``.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
AIRFLOW_HOME = WORK / "airflow"
SOURCE_DB = WORK / "app.db"
LOGS = WORK / "logs"
QUERY = ROOT / "example_dags" / "sql" / "users.sql"

DAG_ID = "example_stopchurn_sql_nightly"
TASK_ID = "sync_users"
ONBOARDING_DAG_ID = "example_stopchurn_onboarding"
EXPORT_TASK_ID = "export_users"
TOKEN = "demo-key"  # noqa: S105 - the local sandbox's key, not a secret
BRAND_ID = 1
ONBOARDED_BRAND_ID = 2
SEED = 2025
USERS = 200
DEPOSITS = 500
DEPOSITS_FROM_MS = 1_733_011_200_000  # 2024-12-01 UTC: a month of deposits

FIRST_NAMES = ["Ana", "Ben", "Chloé", "Dev", "Eve", "Farid", "Greta", "Hiro", "Ines", "Jonas"]
LAST_NAMES = ["Ng", "Smith", "Ďurová", "García", "Okafor", "Lindqvist", None]
STATUSES = ["active", "active", "active", "paused", "cancelled"]


class DemoError(Exception):
    """A step failed; the message says which and where its log is."""


# --- source data -----------------------------------------------------------------------------------------------
def make_user(rng: random.Random, user_id: int) -> dict[str, Any]:
    return {
        "id": user_id,
        "email": f"user{user_id}@example.com",
        "first_name": rng.choice(FIRST_NAMES),
        "last_name": rng.choice(LAST_NAMES),
        "status": rng.choice(STATUSES),
        "signed_up_at": 1_704_067_200_000 + rng.randrange(365 * 86_400) * 1000,
        "marketing_email": rng.random() < 0.6,
        "marketing_sms": rng.random() < 0.3,
        "system_email": True,
        "system_sms": rng.random() < 0.5,
    }


def create_source(rng: random.Random) -> None:
    with sqlite3.connect(SOURCE_DB) as db:
        db.execute(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL, first_name TEXT, last_name TEXT, "
            "status TEXT, signed_up_at INTEGER, marketing_email BOOLEAN, marketing_sms BOOLEAN, "
            "system_email BOOLEAN, system_sms BOOLEAN)"
        )
        rows = [make_user(rng, i) for i in range(1, USERS + 1)]
        db.executemany(f"INSERT INTO users VALUES ({', '.join('?' * len(rows[0]))})", [tuple(r.values()) for r in rows])
        # what the events example (example_stopchurn_events) reads; its own generator, so the users stay the same
        deposits_rng = random.Random(SEED + 1)
        db.execute(
            "CREATE TABLE deposits (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users (id), "
            "amount INTEGER NOT NULL, created_ms INTEGER NOT NULL)"
        )
        db.executemany(
            "INSERT INTO deposits VALUES (?, ?, ?, ?)",
            [
                (
                    i,
                    deposits_rng.randint(1, USERS),
                    deposits_rng.choice([10, 20, 50, 100, 250]) * 100,  # in cents
                    DEPOSITS_FROM_MS + deposits_rng.randrange(30 * 86_400) * 1000,
                )
                for i in range(1, DEPOSITS + 1)
            ],
        )


def mutate_source(rng: random.Random) -> dict[str, int]:
    """Update, add and delete a few users, as a day of activity would."""
    with sqlite3.connect(SOURCE_DB) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM users ORDER BY id")]
        picked = rng.sample(ids, 20)
        updated, deleted = picked[:12], picked[12:]
        for user_id in updated:  # each update really changes the row
            if rng.random() < 0.5:
                db.execute(
                    "UPDATE users SET status = CASE status WHEN 'active' THEN 'paused' ELSE 'active' END WHERE id = ?",
                    (user_id,),
                )
            else:
                db.execute("UPDATE users SET marketing_email = NOT marketing_email WHERE id = ?", (user_id,))
        db.executemany("DELETE FROM users WHERE id = ?", [(i,) for i in deleted])
        new = [make_user(rng, i) for i in range(max(ids) + 1, max(ids) + 11)]
        db.executemany(f"INSERT INTO users VALUES ({', '.join('?' * len(new[0]))})", [tuple(r.values()) for r in new])
    return {"updated": len(updated), "inserted": len(new), "deleted": len(deleted)}


def source_rows() -> list[dict[str, Any]]:
    """The rows StopChurn should hold: the DAG's own query, dotted aliases nested into boolean flags."""
    with sqlite3.connect(SOURCE_DB) as db:
        cursor = db.execute(QUERY.read_text())
        names = [d[0] for d in cursor.description]
        rows = []
        for values in cursor:
            row: dict[str, Any] = {}
            for name, value in zip(names, values, strict=True):
                head, _, tail = name.partition(".")
                if tail:  # marketingPreferences.email etc.: booleans (SQLite stores 0/1)
                    row.setdefault(head, {})[tail] = bool(value)
                else:
                    row[name] = value
            rows.append(row)
    return sorted(rows, key=lambda r: r["id"])


# --- processes -------------------------------------------------------------------------------------------------
def airflow(env: dict[str, str], log_name: str, *args: str) -> float:
    """Run ``airflow <args>`` with this interpreter; raise DemoError with the log's tail on failure."""
    log = LOGS / f"{log_name}.log"
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "airflow", *args], env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if done.returncode != 0:
        raise DemoError(f"`airflow {' '.join(args)}` failed (exit {done.returncode}); log: {log}\n{_tail(log)}")
    return time.monotonic() - started


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])


def start_sandbox(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """Start the sandbox on a free port; return the process and its URL once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_stopchurn.sandbox", "--port", "0", "--token", TOKEN],
        env=env,
        stdout=subprocess.PIPE,
        stderr=(LOGS / "sandbox.log").open("w"),
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()
    try:
        line = lines.get(timeout=20)
    except queue.Empty:
        line = ""
    if "http://" not in line:
        proc.kill()
        raise DemoError(f"the sandbox did not start; log: {LOGS / 'sandbox.log'}\n{_tail(LOGS / 'sandbox.log')}")
    return proc, line[line.index("http://") :].strip()


def stop(proc: subprocess.Popen[str] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def get_json(url: str) -> Any:
    if not url.startswith("http://127.0.0.1:"):
        raise DemoError(f"refusing to read {url}: the demo only talks to its local sandbox")
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - checked just above
        return json.loads(response.read())


def run_summary(dag_id: str = DAG_ID, task_id: str = TASK_ID) -> dict[str, Any]:
    """A task's return value (its summary) of the latest run, from the XCom table of the metadata DB."""
    with sqlite3.connect(AIRFLOW_HOME / "airflow.db") as db:
        row = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = 'return_value' "
            "ORDER BY timestamp DESC LIMIT 1",
            (dag_id, task_id),
        ).fetchone()
    if row is None:
        raise DemoError("the sync task returned no summary")
    value = json.loads(row[0])
    return json.loads(value) if isinstance(value, str) else value


def upload_historical(url: str, brand_id: int, path: Path) -> int:
    """Upload one historical-upload file into the sandbox, as StopChurn's Back Office takes it; return its rows."""
    target = f"{url}/_sandbox/historical/{brand_id}/user"
    if not target.startswith("http://127.0.0.1:"):
        raise DemoError(f"refusing to post to {target}: the demo only talks to its local sandbox")
    request = urllib.request.Request(target, data=path.read_bytes(), method="POST")  # noqa: S310 - checked above
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - checked just above
        return int(json.loads(response.read())["rows"])


def same_as_source(url: str, brand_id: int) -> tuple[bool, int, int]:
    """Whether StopChurn's ``user`` table of ``brand_id`` equals the source, and both row counts."""
    table = get_json(f"{url}/_sandbox/tables/{brand_id}/user")
    expected = source_rows()
    received = sorted(table["rows"], key=lambda r: r["id"])
    same = json.dumps(received, sort_keys=True) == json.dumps(expected, sort_keys=True)  # true is not 1 here
    return same, int(table["count"]), len(expected)


def onboarding(env: dict[str, str], url: str, rng: random.Random) -> bool:
    """Export -> upload -> a nightly run for a second brand; True when StopChurn then equals the source."""
    env = {
        **env,
        "AIRFLOW_CONN_STOPCHURN_DEFAULT": json.dumps(
            {"conn_type": "stopchurn", "host": url, "password": TOKEN, "extra": {"brand_id": ONBOARDED_BRAND_ID}}
        ),
    }
    print(f"\nonboarding brand {ONBOARDED_BRAND_ID}: historical export, upload, then the nightly update run")
    seconds = airflow(env, "onboarding-export", "dags", "test", ONBOARDING_DAG_ID, "2025-01-03")
    exported = run_summary(ONBOARDING_DAG_ID, EXPORT_TASK_ID)
    folder = Path(exported["output_uri"])
    print(
        f"export ({ONBOARDING_DAG_ID}): {exported['rows']} rows in {exported['files']} file(s), "
        f"{exported['bytes']:,} bytes, baseline snapshot committed  [{seconds:.1f}s]"
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    uploaded = sum(upload_historical(url, ONBOARDED_BRAND_ID, folder / f["name"]) for f in manifest["files"])
    same, held, _ = same_as_source(url, ONBOARDED_BRAND_ID)
    print(f"uploaded {len(manifest['files'])} file(s), {uploaded} rows: sandbox == source: {same} ({held} rows)")
    changes = mutate_source(rng)
    print(
        f"source changed: {changes['updated']} users updated, {changes['inserted']} added, {changes['deleted']} deleted"
    )
    seconds = airflow(env, "onboarding-nightly", "dags", "test", DAG_ID, "2025-01-04")
    print(f"nightly run for brand {ONBOARDED_BRAND_ID} ({DAG_ID}): {describe(run_summary())}  [{seconds:.1f}s]")
    same_after, held, expected = same_as_source(url, ONBOARDED_BRAND_ID)
    print(f"sandbox table == source table: {same_after} ({held} rows in StopChurn, {expected} in users)")
    return same and same_after


def describe(summary: dict[str, Any]) -> str:
    return (
        f"{summary['inserted']} inserted, {summary['updated']} updated, {summary['deleted']} deleted, "
        f"{summary['unchanged']} unchanged; {summary['chunks']} request(s), {summary['bytes']:,} bytes"
    )


def page_hint() -> str:
    """How to open the StopChurn page of the Airflow UI on the demo's metadata DB (the API server is not started)."""
    home = AIRFLOW_HOME.relative_to(ROOT)
    airflow_cli = Path(sys.executable).parent / "airflow"
    cli = airflow_cli.relative_to(ROOT) if airflow_cli.is_relative_to(ROOT) else airflow_cli
    return (
        "\nSee both runs on the StopChurn page of the Airflow UI:\n"
        f"  AIRFLOW_HOME={home} {cli} api-server --host 127.0.0.1 --port 8080\n"
        "  then open http://127.0.0.1:8080/stopchurn/ (in the UI: Browse > StopChurn) and log in as admin with the\n"
        f"  password in {home}/simple_auth_manager_passwords.json.generated (written when the API server starts)"
    )


# --- main ------------------------------------------------------------------------------------------------------
def main() -> int:
    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    LOGS.mkdir(parents=True)
    AIRFLOW_HOME.mkdir()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
        "AIRFLOW_CONN_STOPCHURN_DEMO_DB": json.dumps({"conn_type": "sqlite", "host": str(SOURCE_DB)}),
        "PYTHONWARNINGS": "ignore",
    }
    rng = random.Random(SEED)
    sandbox: subprocess.Popen[str] | None = None
    try:
        print("StopChurn provider demo (work files and logs in .demo/)")
        seconds = airflow(env, "db-migrate", "db", "migrate")
        print(f"  Airflow metadata DB migrated ({seconds:.1f}s)")
        create_source(rng)
        print(f"  source: {SOURCE_DB.relative_to(ROOT)}, tables users ({USERS} rows) and deposits ({DEPOSITS} rows)")
        sandbox, url = start_sandbox(env)
        print(f"  StopChurn sandbox: {url}")
        env["AIRFLOW_CONN_STOPCHURN_DEFAULT"] = json.dumps(
            {"conn_type": "stopchurn", "host": url, "password": TOKEN, "extra": {"brand_id": BRAND_ID}}
        )

        for number, day in enumerate(("2025-01-01", "2025-01-02"), start=1):
            if number == 2:
                changes = mutate_source(rng)
                print(
                    f"\nsource changed: {changes['updated']} users updated, {changes['inserted']} added, "
                    f"{changes['deleted']} deleted"
                )
            seconds = airflow(env, f"run-{number}", "dags", "test", DAG_ID, day)
            print(f"run {number} ({DAG_ID}, {day}): {describe(run_summary())}  [{seconds:.1f}s]")

        same, held, expected = same_as_source(url, BRAND_ID)
        print(f"\nsandbox table == source table: {same} ({held} rows in StopChurn, {expected} in users)")
        stats = get_json(f"{url}/_sandbox/stats")
        print(f"sandbox received {stats['accepted_requests']} request(s): {stats['updates']}")
        onboarded = onboarding(env, url, rng)
        print(page_hint())
        print(f"done in {time.monotonic() - started:.1f}s")
        return 0 if same and onboarded else 1
    except DemoError as err:
        print(f"\ndemo failed: {err}", file=sys.stderr)
        return 1
    finally:
        stop(sandbox)


if __name__ == "__main__":
    sys.exit(main())
