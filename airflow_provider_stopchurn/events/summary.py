"""``EventSummary``: what an event run delivered, for the task log, the operator's return value and the history."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_provider_stopchurn.events.ledger import iso_ms


@dataclass
class EventSummary:
    """What the run delivered; ``as_dict()`` is what the operator returns (and Airflow puts in XCom)."""

    brand_id: int
    stream: str
    #: the events StopChurn acknowledged in the whole DAG run (a later try adds what earlier tries delivered)
    sent: int = 0
    #: rows dropped because their key was delivered already or repeats in the source
    duplicates: int = 0
    #: rows older than the window (delivered by an earlier run, or late beyond the lookback), not sent
    before_window: int = 0
    #: rows dated after the run's clock, held (not sent) until a run's clock passes them
    held_future: int = 0
    chunks: int = 0
    bytes: int = 0
    requests: int = 0
    retries: int = 0
    #: chunks of an unfinished plan this run sent
    resumed_chunks: int = 0
    #: chunks of that plan an earlier try of this DAG run had delivered (counted in ``sent``, not sent again)
    settled_chunks: int = 0
    since: str | None = None
    watermark: str | None = None
    watermark_ms: int | None = None
    ledger_keys: int = 0
    dry_run: bool = False
    state_uri: str = ""
    duration_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.dry_run:
            data.pop("samples")
        return data

    def line(self) -> str:
        mode = " (dry run: nothing sent)" if self.dry_run else ""
        resumed = f", {self.resumed_chunks} chunks resumed from an unfinished plan" if self.resumed_chunks else ""
        held = f", {self.held_future} dated after the run's clock held" if self.held_future else ""
        return (
            f"StopChurn events of brand {self.brand_id} stream {self.stream!r}{mode}: {self.sent} sent, "
            f"{self.duplicates} duplicates dropped, {self.before_window} before the window{held}; "
            f"{self.chunks} chunks, {self.bytes} bytes, {self.retries} HTTP retries{resumed}; "
            f"watermark {self.watermark}; {self.duration_s:.2f}s; state {self.state_uri}"
        )

    def record_fields(self) -> dict[str, Any]:
        """The run's fields in the store's history (``history``: kind ``events``)."""
        return {
            "events_sent": self.sent,
            "duplicates": self.duplicates,
            "before_window": self.before_window,
            "held_future": self.held_future,
            "watermark": self.watermark,
            "ledger_size": self.ledger_keys,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "requests": self.requests,
            "http_retries": self.retries,
            "resumed_chunks": self.resumed_chunks,
            "settled_chunks": self.settled_chunks,
        }

    def set_watermark(self, ms: int | None) -> None:
        self.watermark_ms = ms
        self.watermark = None if ms is None else iso_ms(ms)


__all__ = ["EventSummary"]
