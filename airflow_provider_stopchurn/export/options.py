"""The export's options: what shapes one historical export, validated on construction (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from airflow_provider_stopchurn.exceptions import StopChurnConfigError
from airflow_provider_stopchurn.options import LOCK_TTL_S, NO_RUN_INFO, RunInfo, SyncOptions

#: StopChurn's documented limit of one historical-upload file.
MAX_FILE_BYTES = 2_000_000_000


@dataclass(frozen=True)
class ExportOptions:
    """Everything that shapes one export. Validated on construction (no I/O).

    :param run_id: names the run's output folder (an Airflow run id, any text; see
        :func:`~airflow_provider_stopchurn.export.folder.export_folder_name`).
    :param run_key: names the task run: a snapshot committed by the same run_key is this export's own (a retry).
    :param replace_snapshot: replace a snapshot the store holds already (it would otherwise hide changes).
    """

    brand_id: int
    table_name: str
    key_columns: tuple[str, ...] = ("id",)
    created_at_column: str | None = None
    updated_at_column: str | None = None
    max_file_bytes: int = MAX_FILE_BYTES
    replace_snapshot: bool = False
    nest_dotted_columns: bool = True
    decimal_as_string: bool = False
    #: text columns holding JSON, parsed as the update operator's ``json_columns``
    json_columns: tuple[str, ...] = ()
    run_id: str = "manual"
    run_key: str | None = None
    holder: str = "stopchurn-export"
    #: the table lock's lease (as the update operator's ``lock_ttl_s``)
    lock_ttl_s: float = LOCK_TTL_S
    #: while another run holds the table's lock, wait up to this many seconds for it (as an update run does)
    lock_wait_s: float = 300.0
    #: the DAG, task, DAG run and try this run is (recorded in the store's history; not an operator argument)
    run_info: RunInfo = NO_RUN_INFO

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_file_bytes, int) or not 64 <= self.max_file_bytes <= MAX_FILE_BYTES:
            problems.append(
                f"max_file_bytes must be an integer from 64 to {MAX_FILE_BYTES} (StopChurn's limit), got "
                f"{self.max_file_bytes!r}"
            )
        if not isinstance(self.run_id, str) or not self.run_id:
            problems.append(f"run_id must be a non-empty string, got {self.run_id!r}")
        if problems:
            raise StopChurnConfigError("Invalid export options: " + "; ".join(problems) + ".")
        self.sync_options()  # validates brand_id, table_name, key columns

    def sync_options(self) -> SyncOptions:
        """The update engine's options for the same table (what its first ``initial_load="baseline"`` run uses)."""
        return SyncOptions(
            brand_id=self.brand_id,
            table_name=self.table_name,
            key_columns=self.key_columns,
            created_at_column=self.created_at_column,
            updated_at_column=self.updated_at_column,
            initial_load="baseline",
            nest_dotted_columns=self.nest_dotted_columns,
            decimal_as_string=self.decimal_as_string,
            json_columns=self.json_columns,
            holder=self.holder,
            run_key=self.run_key,
            lock_ttl_s=self.lock_ttl_s,
            lock_wait_s=self.lock_wait_s,
            run_info=self.run_info,
        )


__all__ = ["MAX_FILE_BYTES", "ExportOptions"]
