"""The chart of the StopChurn page: one inline SVG of grouped bars per store, a task's runs on a logarithmic scale.

Server-rendered, no script and no CDN. It imports nothing from Airflow.
"""

from __future__ import annotations

import math
from datetime import UTC
from html import escape

from airflow_provider_stopchurn.plugins.model import CHART_RUNS, SERIES_OF, Run, StoreState, SyncTask


def _short(value: int) -> str:
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= size:
            return f"{value // size}{suffix}"
    return str(value)


def chart_runs(task: SyncTask, limit: int = CHART_RUNS, store: tuple[str, int, str] | None = None) -> list[Run]:
    """The runs the chart shows: the newest ``limit`` with counts (a summary, or a history record), dry runs left
    out; with ``store``, only the runs that used that store."""
    runs = [run for run in task.runs if run.has_counts and not run.dry_run]
    if store is not None:
        runs = [run for run in runs if run.store_key == store]
    return runs[-limit:]


def render_chart(task: SyncTask, store: StoreState | None = None) -> str:
    """Grouped bars (inserted, updated, deleted, rejected; an events or export task's own counts) per run, on a
    logarithmic scale; with ``store``, the runs of that store only."""
    runs = chart_runs(task, store=None if store is None else store.key)
    series = SERIES_OF[task.kind]
    if not runs:
        return '<p class="muted chart-empty">No run of this task has left counts here yet.</p>'
    peak = max((run.value(count) or 0) for run in runs for count in series)
    decades = max(1, math.ceil(math.log10(peak + 1)))
    top = math.log10(10**decades + 1)
    bar, gap, left, right, head, plot_h, foot = 14, 22, 52, 12, 12, 180, 26
    group = len(series) * bar + gap
    width = max(480, left + len(runs) * group + right)
    height = head + plot_h + foot
    shows = task.label if store is None else f"{task.label} on {store.label}"

    def y_of(value: int) -> float:
        return head + plot_h - plot_h * math.log10(value + 1) / top

    store_attr = "" if store is None else f' data-store="{escape(store.table_name)}" data-brand="{store.brand_id}"'
    parts = [
        f'<svg class="sync-chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'data-task="{escape(task.key)}"{store_attr} aria-label="Counts per run of {escape(shows)}">'
    ]
    for tick in [0, *(10**i for i in range(decades + 1))]:
        y = y_of(tick)
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_short(tick)}</text>')
    every = max(1, math.ceil(72 / group))  # a label (about 65 px wide) every few runs
    for index, run in enumerate(runs):
        x0 = left + index * group + gap / 2
        parts.append(f'<g class="run" data-run-id="{escape(run.run_id)}">')
        for offset, count in enumerate(series):
            value = run.value(count) or 0
            y = y_of(value)
            parts.append(
                f'<rect class="bar" data-series="{count.col}" data-value="{value}" x="{x0 + offset * bar:.1f}" '
                f'y="{y:.1f}" width="{bar - 2}" height="{head + plot_h - y:.1f}" fill="{count.colour}">'
                f"<title>{escape(run.run_id)}: {value:,} {count.heading}</title></rect>"
            )
        parts.append("</g>")
        if index % every == 0:
            label = run.run_after.astimezone(UTC).strftime("%m-%d %H:%M") if run.run_after else run.run_id[:11]
            cx = x0 + len(series) * bar / 2
            parts.append(
                f'<text class="tick" x="{cx:.1f}" y="{head + plot_h + 16}" text-anchor="middle">{escape(label)}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="legend-item"><span class="swatch" style="background:{c.colour}"></span>{c.heading}</span>'
        for c in series
    )
    return (
        f'<div class="legend">{legend}</div><div class="chart-box">{"".join(parts)}</div>'
        '<p class="note">Runs oldest first, on a logarithmic scale; a bar\'s tooltip names its run.</p>'
    )
