"""The delete safeguards of a plan: a run that would delete too much of the snapshot is refused before anything
is sent, unless ``allow_large_changes`` approves it (recorded and logged). No Airflow import."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from airflow_provider_stopchurn.exceptions import SafeguardError
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.store import Committed

__all__ = ["APPROVE_HINT", "approval", "check_safeguards"]

#: an approved mass delete is logged under the run's logger, whose name users filter on
_run_log = logging.getLogger("airflow_provider_stopchurn.update.sync")
#: How a person lets one run through the delete guards (the example DAGs pass their param to allow_large_changes).
APPROVE_HINT = (
    "To approve it, run once with allow_large_changes=True: in the Airflow UI, press Trigger and switch on "
    'approve_mass_delete under Run Parameters (a DAG param the task passes as allow_large_changes="{{ '
    'params.approve_mass_delete }}", as in the example DAGs).'
)


def check_safeguards(
    deleted: int, source_rows: int, committed: Committed | None, options: SyncOptions
) -> dict[str, int] | None:
    """Raise ``SafeguardError`` when the plan deletes too much; return ``{"deletes", "rows_before"}`` when
    ``allow_large_changes`` lets such a plan through (the approval is recorded), else None."""
    if committed is None:
        return None
    base_rows = committed.rows if committed.rows is not None and committed.rows >= 0 else committed.frame.height
    if base_rows == 0:
        return None
    if source_rows == 0 and not options.allow_empty_source:
        return _tripped(
            options,
            deleted,
            base_rows,
            f"The source of brand {options.brand_id} table {options.table_name!r} is empty; nothing was sent.\n"
            f"The snapshot holds {base_rows} rows: syncing would delete them all.\n"
            f"{APPROVE_HINT} To allow an empty source on every run, set allow_empty_source=True.",
        )
    fraction = deleted / base_rows
    if fraction > options.max_delete_fraction and not (source_rows == 0 and options.allow_empty_source):
        return _tripped(
            options,
            deleted,
            base_rows,
            f"The plan deletes {deleted} of {base_rows} rows ({fraction:.1%}) of brand {options.brand_id} table "
            f"{options.table_name!r}; nothing was sent.\n"
            f"That is more than max_delete_fraction={options.max_delete_fraction:.0%}.\n"
            f"{APPROVE_HINT}",
        )
    return None


def _tripped(options: SyncOptions, deleted: int, base_rows: int, message: str) -> dict[str, int]:
    """A delete guard tripped: the approval to record when ``allow_large_changes`` lets the plan through, else
    raise ``SafeguardError(message)``."""
    if options.allow_large_changes:
        return {"deletes": deleted, "rows_before": base_rows}
    raise SafeguardError(message)


def approval(approved: Mapping[str, Any] | None, options: SyncOptions) -> dict[str, Any] | None:
    """The record of a mass delete ``allow_large_changes`` let through (None when none was), logged as it is made."""
    if not approved:
        return None
    run_id = options.run_info.run_id if options.run_info.run_id is not None else options.run_key
    _run_log.warning(
        "Mass delete approved (allow_large_changes) by run %s: the plan deletes %d of %d rows of %r%s.",
        run_id,
        approved["deletes"],
        approved["rows_before"],
        options.table_name,
        " (dry run: nothing sent)" if options.dry_run else "",
    )
    return {"run_id": run_id, "deletes": int(approved["deletes"]), "rows_before": int(approved["rows_before"])}
