"""``SyncOptions``: every option that shapes a run, defined and validated in one place (no I/O).

The operator builds it from its own arguments (``SyncOptions.field_names()`` lists them), so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from airflow_provider_stopchurn.exceptions import StopChurnConfigError

SchemaPolicy = Literal["fail", "update_all", "rebaseline"]
RejectPolicy = Literal["fail", "quarantine"]

#: Options that change the shape of the JSON sent for the same rows (not only values). Their values are recorded
#: with the committed snapshot, and a run whose value differs goes through ``on_schema_change`` as a retyped column
#: does, so StopChurn never holds rows of two shapes. Each maps to whether it can matter for a table with these
#: columns (a table without dotted names sends the same rows either way). A new shape option is one line here.
#: (``decimal_as_string`` is not listed: it changes the columns' kinds, which the snapshot records already.)
SHAPE_OPTIONS: Mapping[str, Callable[[Iterable[str]], bool]] = {
    "nest_dotted_columns": lambda columns: any("." in c for c in columns),
}


#: The table lock's default lease, in seconds (``lock_ttl_s``): a heartbeat renews it every 30 s while a run works,
#: so it only bounds how long a run killed on another machine (whose process cannot be seen) blocks the table. A
#: quarter of an hour lets the operators' default retries (2, 4, 8 minutes apart, each waiting ``lock_wait_s``)
#: take the table over on another worker within one DAG run.
LOCK_TTL_S = 900.0


def lock_problems(lock_wait_s: Any, lock_ttl_s: Any) -> list[str]:
    """What is wrong with a run's ``lock_wait_s`` and ``lock_ttl_s`` (one message each), for its options' check."""
    problems = []
    if isinstance(lock_wait_s, bool) or not isinstance(lock_wait_s, int | float) or not 0 <= lock_wait_s <= 86_400:
        problems.append(f"lock_wait_s must be a number of seconds within [0, 86400], got {lock_wait_s!r}")
    if isinstance(lock_ttl_s, bool) or not isinstance(lock_ttl_s, int | float) or not 0 < lock_ttl_s <= 86_400:
        problems.append(f"lock_ttl_s must be a number of seconds within (0, 86400], got {lock_ttl_s!r}")
    return problems


#: The integer options of every run that sends chunks: name -> (its least value, the rule as its message words it).
CHUNK_INTEGERS: Mapping[str, tuple[int, str]] = {
    "chunk_size": (1, "a positive integer"),
    "max_chunk_bytes": (64, "an integer >= 64"),
}


def integer_problems(options: Any, rules: Mapping[str, tuple[int, str]]) -> list[str]:
    """What is wrong with a run's integer options (one message each, in the order of ``rules``), for its check.

    :param options: the options (read by attribute).
    :param rules: option name -> (its least value, the rule as its message words it, e.g. "a positive integer").
    """
    problems = []
    for name, (least, rule) in rules.items():
        value = getattr(options, name)
        if not isinstance(value, int) or value < least:
            problems.append(f"{name} must be {rule}, got {value!r}")
    return problems


def refuse_invalid(what: str, problems: list[str], *, lock_wait_s: Any, lock_ttl_s: Any) -> None:
    """Raise one :class:`StopChurnConfigError` naming every problem of a run's options, its lock's times included.

    :param what: the options' kind, for the message ("sync", "event").
    :param problems: what the options' own check found, one message each.
    """
    problems = [*problems, *lock_problems(lock_wait_s, lock_ttl_s)]
    if problems:
        raise StopChurnConfigError(f"Invalid {what} options: " + "; ".join(problems) + ".")


def checked_json_columns(json_columns: Any) -> tuple[tuple[Any, ...], list[str]]:
    """A run's ``json_columns`` as a tuple (one column may be named alone, as a string), and what is wrong with it
    (one message at most), for its options' check.

    :param json_columns: the option as given: a column name, or an iterable of them, or None.
    """
    if isinstance(json_columns, str):  # one column named alone
        json_columns = (json_columns,)
    elif not isinstance(json_columns, tuple):
        json_columns = tuple(json_columns or ())
    if not all(isinstance(c, str) and c for c in json_columns):
        return json_columns, [f"json_columns must name columns, got {json_columns!r}"]
    return json_columns, []


@dataclass(frozen=True)
class RunInfo:
    """Which scheduled task a run is, for its history record: the operators fill it from Airflow's context; the
    engines only copy it (they stay Airflow-free). Every field may be None (a run outside Airflow)."""

    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None
    #: the task instance's try (1 for the first); a killed or failed try's retry has the next number
    try_number: int | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "dag_id": self.dag_id,
            "task_id": self.task_id,
            "run_id": self.run_id,
            "try_number": None if self.try_number is None else int(self.try_number),
        }


NO_RUN_INFO = RunInfo()


@dataclass(frozen=True)
class SyncOptions:
    """Everything that shapes one run. Validated on construction (no I/O)."""

    brand_id: int
    table_name: str
    key_columns: tuple[str, ...] = ("id",)
    created_at_column: str | None = None
    updated_at_column: str | None = None
    initial_load: Literal["send", "baseline"] = "send"
    chunk_size: int = 500
    max_chunk_bytes: int = 5_000_000
    dry_run: bool = False
    max_delete_fraction: float = 0.5
    allow_empty_source: bool = False
    allow_large_changes: bool = False
    on_schema_change: SchemaPolicy = "fail"
    on_rejected_rows: RejectPolicy = "fail"
    max_rejected_rows: int = 100
    max_concurrent_requests: int = 4
    nest_dotted_columns: bool = True
    decimal_as_string: bool = False
    #: text columns holding JSON, parsed before the diff (MariaDB's JSON, SQLite TEXT, JSON kept in VARCHAR...)
    json_columns: tuple[str, ...] = ()
    holder: str = "stopchurn-sync"
    #: names the DAG run (and task) this sync belongs to: a later try of the same run reports the run's whole
    #: delivery, including what earlier tries delivered (None: count this call only)
    run_key: str | None = None
    lock_ttl_s: float = LOCK_TTL_S
    #: updates encoded at a time while delivering: bounds the update JSON held in memory (~400 bytes each)
    window_rows: int = 250_000
    #: how long a run waits for the table's lock while another run holds it, polling with backoff, before it
    #: fails as retryable (0: fail at once)
    lock_wait_s: float = 300.0
    progress_interval_s: float = 10.0
    #: the DAG, task, DAG run and try this run is (recorded in the store's history; not an operator argument)
    run_info: RunInfo = NO_RUN_INFO

    def __post_init__(self) -> None:
        problems = []
        json_columns, json_problems = checked_json_columns(self.json_columns)
        object.__setattr__(self, "json_columns", json_columns)
        problems += json_problems
        if isinstance(self.brand_id, bool) or not isinstance(self.brand_id, int):
            problems.append(f"brand_id must be an integer, got {self.brand_id!r}")
        if not isinstance(self.table_name, str) or not self.table_name.strip():
            problems.append("table_name must be a non-empty string")
        if not self.key_columns or not all(isinstance(k, str) and k for k in self.key_columns):
            problems.append(f"primary_key must name one or more columns, got {self.key_columns!r}")
        if self.initial_load not in ("send", "baseline"):
            problems.append(f"initial_load must be 'send' or 'baseline', got {self.initial_load!r}")
        if self.on_schema_change not in ("fail", "update_all", "rebaseline"):
            problems.append(
                f"on_schema_change must be 'fail', 'update_all' or 'rebaseline', got {self.on_schema_change!r}"
            )
        if self.on_rejected_rows not in ("fail", "quarantine"):
            problems.append(f"on_rejected_rows must be 'fail' or 'quarantine', got {self.on_rejected_rows!r}")
        problems += integer_problems(self, CHUNK_INTEGERS)
        if not 0.0 <= float(self.max_delete_fraction) <= 1.0:
            problems.append(f"max_delete_fraction must be within [0, 1], got {self.max_delete_fraction!r}")
        problems += integer_problems(
            self,
            {
                "max_concurrent_requests": (1, ">= 1"),
                "max_rejected_rows": (0, ">= 0"),
                "window_rows": (1, "a positive integer"),
            },
        )
        refuse_invalid("sync", problems, lock_wait_s=self.lock_wait_s, lock_ttl_s=self.lock_ttl_s)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def shape(self) -> dict[str, Any]:
        """The values of the :data:`SHAPE_OPTIONS` (recorded with the committed snapshot)."""
        return {name: getattr(self, name) for name in SHAPE_OPTIONS}


def shape_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any], columns: Iterable[str]) -> dict[str, str]:
    """The shape options whose value differs between ``old`` (recorded with a snapshot; None: not recorded, by an
    older version) and ``new``, and that matter for a table with ``columns``: {name: "old -> new"}."""
    if old is None:
        return {}
    names = list(columns)
    return {
        name: f"{old[name]!r} -> {new[name]!r}"
        for name, matters in SHAPE_OPTIONS.items()
        if name in old and name in new and old[name] != new[name] and matters(names)
    }


__all__ = ["NO_RUN_INFO", "SHAPE_OPTIONS", "RejectPolicy", "RunInfo", "SchemaPolicy", "SyncOptions", "shape_changes"]
