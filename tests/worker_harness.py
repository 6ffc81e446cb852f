"""One harness for the test suite's worker processes: a run of an engine in a process of its own, that a test
kills (SIGKILL), pauses (SIGSTOP) or lets die at a chosen point.

The worker side (``crash_worker.py``, ``crash_at_write_worker.py``, ``events_crash_worker.py``,
``lock_loss_worker.py``, ``ops_review_worker.py``) reads the API key from a named environment variable, never
from argv (which ``ps`` shows), and prints its outcome as the last line of stdout. The test side starts a worker
with that variable set, waits for the sandbox to see its progress, and always reaps it: a zombie's pid still
looks alive to the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from helpers_sync import wait_until

from airflow_provider_stopchurn.api.client import StopChurnClient

TESTS = Path(__file__).resolve().parent


# --- the worker side ----------------------------------------------------------------------------------------------
def client_from_env(url: str, key_var: str, **kwargs: Any) -> StopChurnClient:
    """The worker's client; the key comes from the environment variable ``key_var``.

    :param url: the sandbox's URL.
    :param key_var: the name of the variable that holds the API key.
    :param kwargs: the client's other arguments (retries, timeouts).
    """
    return StopChurnClient(url, os.environ[key_var], **kwargs)


def print_line(payload: Any) -> None:
    """One line of the worker's stdout, flushed at once: the test may kill the worker right after."""
    print(payload if isinstance(payload, str) else json.dumps(payload), flush=True)


def summary_or_error(run: Callable[[], Any]) -> int:
    """Run one engine run and print its summary as JSON (exit code 0), or ``{"error": <class>, "message":
    <text>}`` when it fails (exit code 1).

    :param run: the run; it returns a summary with ``as_dict()``.
    """
    try:
        summary = run()
    except Exception as err:
        print_line({"error": type(err).__name__, "message": str(err)})
        return 1
    print_line(summary.as_dict())
    return 0


def serve(main: Callable[[list[str]], int]) -> None:
    """The worker's ``__main__``: ``main(argv)``'s return value is the exit code."""
    sys.exit(main(sys.argv[1:]))


# --- the test side ------------------------------------------------------------------------------------------------
def _command(script: str, args: tuple[Any, ...], key_var: str | None, token: str | None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if key_var is not None and token is not None:
        env[key_var] = token
    return {"args": [sys.executable, str(TESTS / script), *map(str, args)], "env": env, "text": True, "cwd": TESTS}


def start_worker(
    script: str,
    *args: Any,
    key_var: str | None = None,
    token: str | None = None,
    stdout: int | IO[Any] = subprocess.PIPE,
    stderr: int | IO[Any] = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """Start ``tests/<script>`` with ``args`` (made strings); the API key ``token`` goes in ``key_var``.

    :param script: the worker's file name in ``tests/``.
    :param args: its arguments.
    :param key_var: the variable the worker reads the key from.
    :param token: the key.
    :param stdout: where its stdout goes.
    :param stderr: where its stderr goes.
    """
    return subprocess.Popen(**_command(script, args, key_var, token), stdout=stdout, stderr=stderr)


def run_worker(
    script: str, *args: Any, key_var: str, token: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``tests/<script>`` to its end (see :func:`start_worker`), its output captured.

    :param timeout: seconds before it counts as hung.
    """
    return subprocess.run(**_command(script, args, key_var, token), capture_output=True, timeout=timeout, check=False)


def accepted_or_ended(sb: Any, proc: subprocess.Popen[str], accepted: int, timeout_s: float = 60) -> bool:
    """Wait until the sandbox accepted ``accepted`` requests or the worker ended; False when neither came.

    :param sb: the sandbox the worker sends to.
    :param proc: the worker.
    :param accepted: the sandbox's ``accepted_requests`` to wait for.
    :param timeout_s: how long to wait.
    """
    return wait_until(lambda: sb.stats()["accepted_requests"] >= accepted or proc.poll() is not None, timeout_s)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """Kill the worker if it still runs when the block ends, and reap it: a zombie's pid still looks alive."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def kill_after(proc: subprocess.Popen[str], sb: Any, accepted: int) -> int:
    """SIGKILL the worker once the sandbox accepted ``accepted`` requests; return how many it had then."""
    with reaped(proc):
        reached = accepted_or_ended(sb, proc, accepted)
        assert reached, "the worker made no progress within 60 s"
        assert proc.poll() is None, f"the worker ended before the kill: {proc.communicate(timeout=10)}"
        proc.send_signal(signal.SIGKILL)
        seen = int(sb.stats()["accepted_requests"])
    assert proc.returncode == -signal.SIGKILL
    return seen
