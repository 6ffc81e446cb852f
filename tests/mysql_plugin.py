"""A throwaway MariaDB server for the test suite (a pytest plugin module).

``mysql_server`` (session scope) runs ``mariadb-install-db`` into a temporary directory, starts ``mariadbd`` on a
free port of 127.0.0.1 as the ``mysql`` OS user (when run as root) without grant tables (any user, no password),
and stops it and removes the directory at the end of the session, whatever the outcome of the tests.

The binaries come from Debian's ``mariadb-server``. Without them, or without mysqlclient (``MySQLdb``), the
MySQL tests are skipped with the reason, unless ``STOPCHURN_REQUIRE_MYSQL=1`` is set: then the fixture fails,
so that CI cannot pass without them.

Tests that need the server carry ``@pytest.mark.mysql``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ENV = "STOPCHURN_REQUIRE_MYSQL"
OS_USER = "mysql"
USER = "root"


class MysqlUnavailable(RuntimeError):
    """No way to run a MariaDB server on this machine."""


@dataclasses.dataclass(frozen=True)
class MysqlServer:
    """Where a running test server (or one database of it) can be reached. No grant tables: no password."""

    host: str
    port: int
    database: str = ""

    def with_database(self, database: str) -> MysqlServer:
        return dataclasses.replace(self, database=database)

    def connect(self, **kwargs: Any) -> Any:
        """A MySQLdb connection (autocommit) to this database; close it (or use it as a context manager)."""
        import MySQLdb

        conn = MySQLdb.connect(
            host=self.host, port=self.port, user=USER, database=self.database, charset="utf8mb4", **kwargs
        )
        conn.autocommit(True)
        return conn

    def execute(self, *statements: str) -> None:
        """Run a few SQL statements, each in autocommit mode."""
        conn = self.connect()
        try:
            cursor = conn.cursor()
            for statement in statements:
                cursor.execute(statement)
        finally:
            conn.close()

    def airflow_connection_json(self, **extra: Any) -> str:
        """The connection in the JSON form Airflow accepts from an ``AIRFLOW_CONN_<ID>`` variable."""
        return json.dumps(
            {
                "conn_type": "mysql",
                "host": self.host,
                "port": self.port,
                "login": USER,
                "schema": self.database,
                "extra": {"charset": "utf8mb4", **extra},
            }
        )


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.is_file()), None
    )
    if found is None:
        raise MysqlUnavailable(f"{name} not found (install Debian's mariadb-server)")
    return found


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise MysqlUnavailable("running as root, but `runuser` is missing")
    import pwd

    try:
        pwd.getpwnam(OS_USER)
    except KeyError as err:
        raise MysqlUnavailable(f"running as root, but there is no {OS_USER!r} OS user") from err
    return [runuser, "-u", OS_USER, "--"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


class _ServerProcess:
    """mariadb-install-db + mariadbd in one temporary directory."""

    def __init__(self) -> None:
        self.install_db = _binary("mariadb-install-db")
        self.mariadbd = _binary("mariadbd")
        self.prefix = _as_server_user()
        self.root = Path(tempfile.mkdtemp(prefix="stopchurn-mariadb-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        if self.prefix:
            import pwd

            entry = pwd.getpwnam(OS_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def install(self) -> None:
        result = subprocess.run(
            [
                *self.prefix,
                self.install_db,
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--user={OS_USER}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def start(self, port: int) -> None:
        with open(self.logfile, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.prefix,
                    self.mariadbd,
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    f"--user={OS_USER}",
                    f"--port={port}",
                    "--bind-address=127.0.0.1",
                    f"--socket={self.root / 'sock'}",
                    f"--pid-file={self.root / 'pid'}",
                    "--skip-grant-tables",
                    "--skip-name-resolve",
                    "--innodb-buffer-pool-size=32M",
                    "--innodb-flush-log-at-trx-commit=0",
                    "--innodb-doublewrite=0",
                    "--character-set-server=utf8mb4",
                    "--collation-server=utf8mb4_bin",
                    "--default-time-zone=+00:00",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.process = None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_ready(process: _ServerProcess, server: MysqlServer, seconds: float = 60) -> None:
    import MySQLdb

    deadline = time.monotonic() + seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.process is not None and process.process.poll() is not None:
            raise RuntimeError(f"mariadbd exited ({process.process.returncode}):\n{_tail(process.logfile)}")
        try:
            server.connect(connect_timeout=2).close()
            return
        except MySQLdb.OperationalError as err:
            last = err
            time.sleep(0.2)
    raise RuntimeError(f"MariaDB on port {server.port} never accepted connections: {last}\n{_tail(process.logfile)}")


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but MariaDB cannot run: {reason}", pytrace=False)
    pytest.skip(f"MariaDB unavailable: {reason}")


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[MysqlServer]:
    """A running, disposable MariaDB server on 127.0.0.1 (no grant tables, session time zone UTC)."""
    try:
        import MySQLdb  # noqa: F401

        process = _ServerProcess()
    except (ImportError, MysqlUnavailable) as err:
        _unavailable(str(err))
        raise  # unreachable: _unavailable skips or fails
    try:
        process.install()
        server = None
        for attempt in range(3):  # another process may grab the port between probing and binding
            port = _free_port()
            process.start(port)
            server = MysqlServer(host="127.0.0.1", port=port)
            try:
                _wait_ready(process, server)
                break
            except RuntimeError:
                process.stop()
                if attempt == 2:
                    raise
        assert server is not None
        yield server
    finally:
        process.stop()
        process.remove()


@pytest.fixture
def mysql_database(mysql_server: MysqlServer) -> Iterator[MysqlServer]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    mysql_server.execute(f"CREATE DATABASE `{name}`")
    try:
        yield mysql_server.with_database(name)
    finally:
        with contextlib.suppress(Exception):
            mysql_server.execute(f"DROP DATABASE IF EXISTS `{name}`")


def set_airflow_mysql_conn(monkeypatch: pytest.MonkeyPatch, server: MysqlServer, conn_id: str, **extra: Any) -> str:
    """Point the Airflow connection ``conn_id`` at ``server`` through ``AIRFLOW_CONN_<ID>``."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", server.airflow_connection_json(**extra))
    return conn_id


@pytest.fixture
def mysql_conn_id(mysql_database: MysqlServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """An Airflow connection id for a fresh database of its own (see ``mysql_database``)."""
    return set_airflow_mysql_conn(monkeypatch, mysql_database, "stopchurn_test_mysql")
