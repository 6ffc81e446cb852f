"""Running one command: its handler, its output kept on stdout, any error as one line on stderr."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from airflow_provider_stopchurn.cli import repair, show, warehouse
from airflow_provider_stopchurn.cli._common import ERROR, OK, USAGE, Aborted, CommandError, UsageError

_HANDLERS: dict[str, Callable[[argparse.Namespace, TextIO], None]] = {
    "status": show._status,
    "history": show._history,
    "rejected": show._rejected,
    "unlock": repair._unlock,
    "settle": repair._settle,
    "rebaseline": repair._rebaseline,
    "reconcile": warehouse._reconcile,
}


def run(command: str, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``command`` with parsed ``args``; one clear line on stderr for any error."""
    out = out if out is not None else sys.stdout
    try:
        with _logs_to_stderr():
            _HANDLERS[command](args, out)
    except UsageError as err:
        print(f"stopchurn {command}: {err}", file=sys.stderr)
        return USAGE
    except Aborted as err:
        print(f"stopchurn {command}: {err}", file=sys.stderr)
        return ERROR
    except KeyboardInterrupt:
        print(f"stopchurn {command}: interrupted", file=sys.stderr)
        return ERROR
    except Exception as err:
        print(f"stopchurn {command}: error: {_one_line(err)}", file=sys.stderr)
        return ERROR
    return OK


@contextlib.contextmanager
def _logs_to_stderr() -> Iterator[None]:
    """Keep stdout for the command's output (``--json`` is one document): logs go to stderr meanwhile.

    Airflow, once imported (``--conn-id``, ``--sql``, ``airflow stopchurn``), logs to stdout: its handlers that
    write there are pointed at stderr for the command, and one it sets up during the command finds stderr as
    ``sys.stdout``.
    """
    stdout = sys.stdout
    moved = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler) and handler.stream is stdout
    ]
    for handler in moved:
        handler.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler in moved:
            handler.setStream(stdout)


def _one_line(err: BaseException) -> str:
    from airflow_provider_stopchurn.exceptions import StopChurnError

    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(err, StopChurnError | CommandError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
