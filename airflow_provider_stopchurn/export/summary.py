"""What one export wrote: the operator's return value, the fields of the store's history record, the log line."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ExportSummary:
    """What the export wrote; ``as_dict()`` is what the operator returns (and Airflow puts in XCom)."""

    brand_id: int
    table_name: str
    rows: int = 0
    files: int = 0
    bytes: int = 0
    output_uri: str = ""
    manifest_uri: str = ""
    snapshot_uri: str = ""
    snapshot_version: str = ""
    replaced_snapshot: bool = False
    #: rows of the replaced snapshot the export lacks, kept in the new one: the next update run deletes them
    kept_rows: int = 0
    #: acknowledged chunks of an unfinished update plan settled before the snapshot was replaced
    settled_chunks: int = 0
    duration_s: float = 0.0
    file_list: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("file_list")  # the manifest lists every file; XCom stays small
        return data

    def record_fields(self) -> dict[str, Any]:
        """The run's fields in the store's history (``history``: kind ``export``)."""
        return {
            "rows_exported": self.rows,
            "files": self.files,
            "bytes_exported": self.bytes,
            "replaced_snapshot": self.replaced_snapshot,
            "kept_rows": self.kept_rows,
            "settled_chunks": self.settled_chunks,
        }

    def line(self) -> str:
        return (
            f"StopChurn historical export of brand {self.brand_id} table {self.table_name!r}: {self.rows} rows in "
            f"{self.files} file(s), {self.bytes} bytes, under {self.output_uri}; baseline snapshot "
            f"{self.snapshot_version} committed at {self.snapshot_uri}; {self.duration_s:.2f}s"
        )


__all__ = ["ExportSummary"]
