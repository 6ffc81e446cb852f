"""A throwaway MariaDB server from the system's binaries (no pytest; ``mysql_plugin.py`` wraps it in fixtures).

:func:`running_mariadb` runs ``mariadb-install-db`` into a temporary directory, starts ``mariadbd`` on a free port
of 127.0.0.1 as the ``mysql`` OS user (when run as root) without grant tables (any user, no password), and stops
it and removes the directory on exit, whatever happened inside. The binaries come from Debian's
``mariadb-server``; without them, or without mysqlclient (``MySQLdb``), it raises :class:`MysqlUnavailable`
before starting anything. What it shares with the PostgreSQL starter lives in ``throwaway_server.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from throwaway_server import ScratchDir, ServerUnavailable, as_os_user, on_free_port, tail, wait_accepting

OS_USER = "mysql"
USER = "root"


class MysqlUnavailable(ServerUnavailable):
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


class _ServerProcess(ScratchDir):
    """mariadb-install-db + mariadbd in one temporary directory."""

    def __init__(self) -> None:
        self.install_db = _binary("mariadb-install-db")
        self.mariadbd = _binary("mariadbd")
        super().__init__("stopchurn-mariadb-", OS_USER, as_os_user(OS_USER, MysqlUnavailable))
        self.process: subprocess.Popen[bytes] | None = None

    def install(self) -> None:
        self.setup_step(
            "mariadb-install-db",
            [
                self.install_db,
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--user={OS_USER}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            timeout=180,
        )

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


def _wait_ready(process: _ServerProcess, server: MysqlServer) -> None:
    import MySQLdb

    def exited() -> str | None:
        if process.process is None or process.process.poll() is None:
            return None
        return f"mariadbd exited ({process.process.returncode}):\n{tail(process.logfile)}"

    def probe() -> None:
        server.connect(connect_timeout=2).close()

    wait_accepting(
        "MariaDB", server.port, probe, MySQLdb.OperationalError, exited=exited, log=process.logfile, interval=0.2
    )


@contextlib.contextmanager
def running_mariadb() -> Iterator[MysqlServer]:
    """A running, disposable MariaDB server on 127.0.0.1 (no grant tables, session time zone UTC), stopped and
    removed on exit. Raises :class:`MysqlUnavailable` before starting anything when mysqlclient or the binaries
    (or, as root, ``runuser`` and a ``mysql`` OS user) are missing; ``RuntimeError`` when it fails to start."""
    try:
        import MySQLdb  # noqa: F401
    except ImportError as err:
        raise MysqlUnavailable(str(err)) from err
    process = _ServerProcess()
    try:
        process.install()

        def start(port: int) -> MysqlServer:
            process.start(port)
            server = MysqlServer(host="127.0.0.1", port=port)
            try:
                _wait_ready(process, server)
            except RuntimeError:
                process.stop()
                raise
            return server

        yield on_free_port(start)
    finally:
        process.stop()
        process.remove()
