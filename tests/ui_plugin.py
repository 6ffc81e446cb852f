"""A real Airflow API server and a real headless Chromium for the UI tests (helpers of test_ui_page.py).

Chromium is Debian's ``chromium`` package (``/usr/bin/chromium``; ``STOPCHURN_CHROMIUM`` names another binary),
driven by Playwright for Python with ``executable_path`` pointed at it: Playwright's own browser downloads are
never used (the machines have no internet). Without Playwright or a chromium that starts, the browser tests are
skipped with the reason, unless ``STOPCHURN_REQUIRE_BROWSER=1`` is set (``.ci/run`` sets it): then they fail, so
that CI cannot pass without them.

:func:`start_api_server` runs ``airflow api-server`` on a free port of 127.0.0.1 against the test session's
AIRFLOW_HOME and metadata database, waits (bounded) until it answers, and :meth:`ApiServer.stop` ends it and its
process group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from throwaway_server import free_port, stop_session
from throwaway_server import tail as _tail

REQUIRE_ENV = "STOPCHURN_REQUIRE_BROWSER"
CHROMIUM_ENV = "STOPCHURN_CHROMIUM"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TESTS = Path(__file__).resolve().parent
#: Screenshots of the browser tests (gitignored); CI keeps the folder as the tests' artifacts.
ARTIFACTS = TESTS.parent / ".artifacts" / "ui"


class BrowserUnavailable(RuntimeError):
    """No headless Chromium that Playwright can drive on this machine."""


def unavailable(reason: str) -> None:
    """Skip (locally) or fail (``STOPCHURN_REQUIRE_BROWSER=1``) for want of a browser."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the browser tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"headless Chromium unavailable: {reason}")


def find_chromium() -> str:
    """The chromium binary: ``$STOPCHURN_CHROMIUM``, else Debian's ``/usr/bin/chromium``, else one on PATH."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        if not (Path(configured).is_file() and os.access(configured, os.X_OK)):
            raise BrowserUnavailable(f"{CHROMIUM_ENV}={configured} is not an executable file")
        return configured
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BrowserUnavailable("no chromium binary (install Debian's package: apt-get install -y chromium)")


def check_browser() -> str:
    """Skip (or fail, in CI) unless Playwright imports and a chromium binary is there; return the binary."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        unavailable(f"Playwright for Python is not installed ({err}); it is in the dev extra")
    try:
        return find_chromium()
    except BrowserUnavailable as err:
        unavailable(str(err))
        raise  # unreachable: unavailable() skips or fails


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A launched headless Chromium (a Playwright ``Browser``); closed, with Playwright, at the end."""
    executable = check_browser()
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000)
        except Exception as err:
            unavailable(f"{executable} did not start under Playwright: {err}")
            raise
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


# --- the API server --------------------------------------------------------------------------------------------
class ApiServer:
    """``airflow api-server`` (core app only, one worker) on 127.0.0.1, started by :func:`start_api_server`."""

    def __init__(self, port: int, log: Path, env: Mapping[str, str]) -> None:
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--workers", "1", "--apps", "core"]
        with log.open("w") as out:
            self.process = subprocess.Popen(
                command,
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends the server and its children
            )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"airflow api-server exited ({self.process.returncode}) before answering; log {self.log}:\n"
                    f"{_tail(self.log)}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(
            f"airflow api-server did not answer on {self.url} within {timeout_s:g} s; log {self.log}:\n"
            f"{_tail(self.log)}"
        )

    def stop(self) -> None:
        stop_session(self.process)


def start_api_server(env: Mapping[str, str], log_dir: Path, *, timeout_s: float = 120.0) -> ApiServer:
    """Start ``airflow api-server`` with ``env`` on a free port; return it once it answers (bounded wait).

    A port taken by someone else between probing and binding makes the server exit: up to three ports are tried.
    """
    last: Exception | None = None
    for attempt in range(3):
        server = ApiServer(free_port(), log_dir / f"api-server-{attempt}.log", env)
        try:
            server.wait_ready(timeout_s)
            return server
        except RuntimeError as err:
            server.stop()
            last = err
            if "address already in use" not in _tail(server.log).lower():
                break
    raise RuntimeError(str(last))
