"""How the StopChurn page writes a time, an age, a count and a run's state, and its links into Airflow's own UI.

It imports nothing from Airflow.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

from airflow_provider_stopchurn.plugins.model import Run, SyncTask


def when(value: datetime | None) -> str:
    """A time as the page writes it, in UTC to the minute; ``-`` for none."""
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def parse_time(value: Any) -> datetime | None:
    """A time of a record or lock: epoch seconds or ISO 8601 (naive: UTC); None when it is neither."""
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (ValueError, OverflowError, OSError):  # not epoch seconds (e.g. milliseconds): no time to show
            return None
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def age(since: datetime | None, now: datetime) -> str:
    """How long ago ``since`` was, in the largest unit that keeps it readable (``?`` when not known)."""
    if since is None:
        return "?"
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def num(value: int | None) -> str:
    """A count with thousands separators; ``-`` for none."""
    return "-" if value is None else f"{value:,}"


def state_badge(state: str | None) -> str:
    """An Airflow task state as a coloured badge (``no run yet`` without one)."""
    name = state or "no run yet"
    css = {
        "success": "ok",
        "failed": "bad",
        "upstream_failed": "bad",
        "up_for_retry": "warn",
        "running": "run",
        "queued": "run",
        "scheduled": "run",
        "deferred": "run",
    }.get(state or "", "none")
    return f'<span class="badge {css}" data-state="{escape(name)}">{escape(name.replace("_", " "))}</span>'


class Links:
    """Links into Airflow's own UI. They carry ``data-airflow-link``: inside Airflow's frame the page's script
    opens them in the whole window (see :data:`_SCRIPT`); on their own they are plain links."""

    def __init__(self, airflow_base: str) -> None:
        self.base = airflow_base if airflow_base.endswith("/") else airflow_base + "/"

    def dag(self, dag_id: str) -> str:
        return f"{self.base}dags/{quote(dag_id, safe='')}"

    def task_instance(self, task: SyncTask, run: Run) -> str:
        url = f"{self.dag(task.dag_id)}/runs/{quote(run.run_id, safe='')}/tasks/{quote(task.task_id, safe='')}"
        return url if task.map_index < 0 else f"{url}/mapped/{task.map_index}"

    def anchor(self, url: str, text: str) -> str:
        return f'<a href="{escape(url)}" data-airflow-link>{escape(text)}</a>'
