"""A throwaway PostgreSQL server from the system's binaries: the test suite's and the benchmark's (no pytest).

:func:`running_postgres` runs ``initdb`` into a temporary directory, starts the server on a free port of
127.0.0.1 with durability switched off (fast, disposable), and stops it and removes the directory on exit,
whatever happened inside. ``tests/pg_plugin.py`` wraps it in pytest fixtures; ``benchmarks/run.py`` uses it
directly (it puts this directory on ``sys.path``).
What it shares with the MariaDB starter lives in ``throwaway_server.py``.

The binaries are looked up on ``PATH`` first, then in ``/usr/lib/postgresql/<version>/bin`` (newest first).
``initdb`` refuses to run as root, so as root every server command runs as the ``postgres`` user via
``runuser``. Without usable binaries :func:`running_postgres` raises :class:`PostgresUnavailable` (the caller
decides whether that skips or fails).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from throwaway_server import (
    ScratchDir,
    ServerUnavailable,
    as_os_user,
    free_port,
    on_free_port,
    run_command,
    tail,
    wait_accepting,
)

_free_port = free_port  # the name tests import from here

SUPERUSER = "postgres"
_SERVER_SETTINGS = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "wal_level=minimal",
    "max_wal_senders=0",
    "max_connections=60",
    "shared_buffers=32MB",
    "log_min_messages=warning",
)


class PostgresUnavailable(ServerUnavailable):
    """No way to run a PostgreSQL server on this machine."""


@dataclasses.dataclass(frozen=True)
class PostgresServer:
    """Where a running test server (or one database of it) can be reached. Trust auth: no password."""

    host: str
    port: int
    user: str
    dbname: str

    @property
    def dsn(self) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={self.dbname}"

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def with_database(self, dbname: str) -> PostgresServer:
        return dataclasses.replace(self, dbname=dbname)

    def connect(self, *, autocommit: bool = True) -> Any:
        """A psycopg (3) connection to this database; close it (or use it as a context manager)."""
        import psycopg

        return psycopg.connect(self.dsn, autocommit=autocommit)

    def execute(self, *statements: str) -> None:
        """Run a few SQL statements, each in autocommit mode."""
        with self.connect() as conn:
            for statement in statements:
                conn.execute(statement)

    def airflow_connection_json(self) -> str:
        """The connection in the JSON form Airflow accepts from an ``AIRFLOW_CONN_<ID>`` variable."""
        return json.dumps(
            {
                "conn_type": "postgres",
                "host": self.host,
                "port": self.port,
                "login": self.user,
                "schema": self.dbname,
            }
        )


# --- finding the binaries ------------------------------------------------------------------------------------
def _version_key(bindir: str) -> tuple[int, ...]:
    match = re.search(r"/postgresql/([\d.]+)/bin$", bindir)
    return tuple(int(part) for part in match.group(1).split(".") if part) if match else ()


@dataclasses.dataclass(frozen=True)
class PostgresBinaries:
    initdb: Path
    pg_ctl: Path


def find_postgres_binaries() -> PostgresBinaries:
    """``initdb`` and ``pg_ctl``: from PATH first, else from the newest system install."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return PostgresBinaries(Path(initdb), Path(pg_ctl))
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        bindir = Path(candidate)
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return PostgresBinaries(bindir / "initdb", bindir / "pg_ctl")
    raise PostgresUnavailable(
        "no PostgreSQL server binaries found (initdb/pg_ctl neither on PATH nor in /usr/lib/postgresql/*/bin)"
    )


# --- the server ----------------------------------------------------------------------------------------------
class _ServerProcess(ScratchDir):
    """initdb + pg_ctl start/stop in one temporary directory."""

    def __init__(self, binaries: PostgresBinaries) -> None:
        super().__init__(
            "stopchurn-pg-", SUPERUSER, as_os_user(SUPERUSER, PostgresUnavailable, " (initdb refuses root)")
        )
        self.binaries = binaries
        self.started = False

    def initdb(self) -> None:
        self.setup_step(
            "initdb",
            [
                str(self.binaries.initdb),
                "-D",
                str(self.datadir),
                "--auth=trust",
                f"--username={SUPERUSER}",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=120,
        )

    def start(self, port: int) -> None:
        options = " ".join(
            [f"-h 127.0.0.1 -p {port} -k {self.root}", *(f"-c {setting}" for setting in _SERVER_SETTINGS)]
        )
        result = run_command(
            [
                *self.prefix,
                str(self.binaries.pg_ctl),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            timeout=90,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_ctl start failed ({result.returncode}) on port {port}:\n{result.stdout}\n{result.stderr}"
                f"\n--- server log ---\n{tail(self.logfile)}"
            )
        self.started = True

    def stop(self) -> None:
        if self.started:
            for mode in ("fast", "immediate"):  # immediate: the last resort
                stopped = run_command(
                    [*self.prefix, str(self.binaries.pg_ctl), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
                    timeout=60,
                )
                if stopped.returncode == 0:
                    break
            self.started = False


def _wait_ready(server: PostgresServer) -> None:
    import psycopg

    def probe() -> None:
        with psycopg.connect(server.dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")

    wait_accepting("PostgreSQL", server.port, probe, psycopg.OperationalError)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A running, disposable PostgreSQL server (database ``postgres``, trust auth on 127.0.0.1), stopped and
    removed on exit. Raises :class:`PostgresUnavailable` before starting anything when the binaries (or, as
    root, ``runuser`` and a ``postgres`` OS user) are missing; ``RuntimeError`` when the server fails to start."""
    process = _ServerProcess(find_postgres_binaries())
    try:
        process.initdb()

        def start(port: int) -> PostgresServer:
            process.start(port)
            return PostgresServer(host="127.0.0.1", port=port, user=SUPERUSER, dbname="postgres")

        server = on_free_port(start)
        _wait_ready(server)
        yield server
    finally:
        process.stop()
        process.remove()
