"""What every throwaway database server of the test suite shares: PostgreSQL (``pg_server.py``), MariaDB
(``mariadb_server.py``), and the pytest side of both (``pg_plugin.py``, ``mysql_plugin.py``).

A server lives in a temporary directory of its own, runs on a free port of 127.0.0.1 and, when the suite runs
as root, as an unprivileged OS user through ``runuser`` (``initdb`` refuses root; ``mariadbd`` is meant not to
run as root). The process side imports nothing from pytest, so that the benchmark can start the same servers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

T = TypeVar("T")
DatabaseT = TypeVar("DatabaseT", bound="Database")


class ServerUnavailable(RuntimeError):
    """No way to run this database server on this machine (the caller decides whether that skips or fails)."""


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    """The end of a server's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_session(process: subprocess.Popen[Any], timeout: float = 20) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it forked: SIGTERM to its session,
    SIGKILL after a bounded wait. The group is always swept: children of the session may outlive its leader.

    :param process: the session's leader.
    :param timeout: seconds to wait after each signal.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)


def run_command(cmd: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a server command to its end; the caller reads the return code."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def as_os_user(os_user: str, unavailable: type[ServerUnavailable], why: str = "") -> list[str]:
    """Command prefix that runs a server command as ``os_user`` (empty unless we are root).

    :param os_user: the unprivileged OS user the server runs as.
    :param unavailable: the exception raised when that is impossible here.
    :param why: said after the missing ``runuser``, e.g. why root will not do.
    """
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise unavailable(f"running as root, but `runuser` is missing{why}")
    import pwd

    try:
        pwd.getpwnam(os_user)
    except KeyError as err:
        raise unavailable(f"running as root, but there is no {os_user!r} OS user") from err
    return [runuser, "-u", os_user, "--"]


class ScratchDir:
    """A server's temporary directory (data directory and log), owned by the server's OS user.

    :param prefix: the temporary directory's name prefix.
    :param os_user: the OS user the server runs as.
    :param prefix_cmd: the command prefix from :func:`as_os_user` (empty: the directory stays ours).
    """

    def __init__(self, prefix: str, os_user: str, prefix_cmd: list[str]) -> None:
        self.prefix = prefix_cmd
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        if prefix_cmd:
            import pwd

            entry = pwd.getpwnam(os_user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def setup_step(self, what: str, args: list[str], timeout: float) -> None:
        """Run a one-off set-up command (``initdb``, ``mariadb-install-db``) as the server's OS user.

        :param what: the command's name in the error.
        :param args: the command line.
        :param timeout: seconds before it counts as hung.
        """
        result = run_command([*self.prefix, *args], timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def wait_accepting(
    product: str,
    port: int,
    probe: Callable[[], None],
    refused: type[Exception],
    *,
    exited: Callable[[], str | None] = lambda: None,
    log: Path | None = None,
    seconds: float = 60,
    interval: float = 0.1,
) -> None:
    """Wait (bounded) until ``probe()`` connects to the server just started.

    :param product: the server's name in the error.
    :param port: its port, for the error.
    :param probe: connects once and returns; raises ``refused`` while the server is not ready.
    :param refused: the driver's error for "not yet".
    :param exited: says why the server is gone when it died (then waiting is pointless), else None.
    :param log: the server's log, whose end the error quotes.
    :param seconds: how long to wait.
    :param interval: the pause between two probes.
    """
    deadline = time.monotonic() + seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        died = exited()
        if died is not None:
            raise RuntimeError(died)
        try:
            probe()
            return
        except refused as err:
            last = err
            time.sleep(interval)
    quoted = f"\n{tail(log)}" if log is not None else ""
    raise RuntimeError(f"{product} on port {port} never accepted connections: {last}{quoted}")


def on_free_port(start: Callable[[int], T], attempts: int = 3) -> T:
    """Call ``start(port)`` with a free port until it does not raise ``RuntimeError``: another process may grab
    the port between probing and binding.

    :param start: starts the server on the port (and cleans up after itself when it raises).
    :param attempts: how many ports to try before the last error propagates.
    """
    for attempt in range(attempts):
        try:
            return start(free_port())
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable: the loop returns or raises")


# --- the pytest side --------------------------------------------------------------------------------------
class Database(Protocol):
    def execute(self, *statements: str) -> None: ...

    def with_database(self, name: str) -> Any: ...


def skip_or_fail(require_env: str, product: str, reason: str) -> NoReturn:
    """Skip the test that needs the server, or fail it when ``<require_env>=1`` (CI must not pass without it).

    :param require_env: the variable that makes a missing server an error.
    :param product: the server's name in the message.
    :param reason: why it cannot run.
    """
    import pytest  # here, not at the top: the benchmark imports this module without pytest

    if os.environ.get(require_env) == "1":
        pytest.fail(f"{require_env}=1 but {product} cannot run: {reason}", pytrace=False)
    pytest.skip(f"{product} unavailable: {reason}")


def server_fixtures(
    name: str,
    running: Callable[[], contextlib.AbstractContextManager[DatabaseT]],
    require_env: str,
    product: str,
    *,
    quote: str,
    drop_suffix: str = "",
) -> tuple[Any, Any]:
    """The two fixtures of a server plugin: ``<name>_server`` (session scope; skips, or fails, when the server
    cannot run here) and ``<name>_database`` (a fresh, empty database of it for one test, dropped afterwards).

    :param name: the fixtures' prefix.
    :param running: the server's context manager factory, which raises :class:`ServerUnavailable` first.
    :param require_env: see :func:`skip_or_fail`.
    :param product: see :func:`skip_or_fail`.
    :param quote: the server's identifier quote.
    :param drop_suffix: what follows ``DROP DATABASE ...`` (PostgreSQL ends the open sessions).
    """
    import pytest  # here, not at the top: the benchmark imports this module without pytest

    @pytest.fixture(scope="session", name=f"{name}_server")
    def server() -> Iterator[DatabaseT]:
        with contextlib.ExitStack() as stack:
            try:
                running_server = stack.enter_context(running())
            except ServerUnavailable as err:
                skip_or_fail(require_env, product, str(err))
            yield running_server

    @pytest.fixture(name=f"{name}_database")
    def database(request: pytest.FixtureRequest) -> Iterator[DatabaseT]:
        running_server = request.getfixturevalue(f"{name}_server")
        database_name = f"t_{uuid.uuid4().hex[:16]}"
        running_server.execute(f"CREATE DATABASE {quote}{database_name}{quote}")
        try:
            yield running_server.with_database(database_name)
        finally:
            with contextlib.suppress(Exception):
                running_server.execute(f"DROP DATABASE IF EXISTS {quote}{database_name}{quote}{drop_suffix}")

    server.__doc__ = f"A running, disposable {product} server on 127.0.0.1 for the session."
    database.__doc__ = "A fresh, empty database for one test, dropped afterwards."
    return server, database


def set_airflow_conn(monkeypatch: Any, conn_id: str, connection_json: str) -> str:
    """Point the Airflow connection ``conn_id`` at a server through ``AIRFLOW_CONN_<ID>``; returns ``conn_id``."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", connection_json)
    return conn_id
