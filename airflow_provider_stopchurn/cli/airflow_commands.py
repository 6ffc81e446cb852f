"""``airflow stopchurn ...``: the same commands registered in Airflow's CLI (listed in the provider info).

Airflow is imported inside :func:`airflow_cli_commands` only."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from airflow_provider_stopchurn.cli._common import _EPILOG, OK
from airflow_provider_stopchurn.cli._run import run
from airflow_provider_stopchurn.cli.parser import COMMANDS


def _airflow_action(command: str) -> Callable[[argparse.Namespace], None]:
    def action(args: argparse.Namespace) -> None:
        code = run(command, args)
        if code != OK:
            raise SystemExit(code)

    action.__name__ = f"stopchurn_{command}"
    return action


def airflow_cli_commands() -> list[Any]:
    """The ``airflow stopchurn`` command group, listed under ``cli`` in the provider info (Airflow 3.2+)."""
    from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand

    return [
        GroupCommand(
            name="stopchurn",
            help="Status and recovery of StopChurn snapshot stores",
            subcommands=[
                ActionCommand(
                    name=name,
                    help=text,
                    description=text,
                    epilog=_EPILOG,
                    func=_airflow_action(name),
                    args=[Arg(flags, **kwargs) for flags, kwargs in specs],
                )
                for name, (text, specs) in COMMANDS.items()
            ],
        )
    ]
