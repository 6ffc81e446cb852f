"""The API key never leaks from a sync: not in logs, errors, the summary, snapshot or history files, or reprs.

Each path (success, 401, 400, 5xx forever, quarantine) runs a full sync with a recognisable key, every logger
at DEBUG, and then searches everything the run left behind for the key (and its distinctive middle part).
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers_sync import T0, Churn, list_files, make_client, options

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.exceptions import (
    StopChurnAuthError,
    StopChurnRejectedError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

KEY = "sk-LEAKCHECK-9f8e7d6c5b4a"
NEEDLES = (KEY, "LEAKCHECK", "9f8e7d6c5b4a")


def _leaks(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return [n for n in NEEDLES if n in text]


@dataclass
class FileWatcher:
    """A sender that, before each request, reads every file under the snapshot root (LOCK and PLAN included)."""

    client: StopChurnClient
    root: Path
    seen: dict[str, bytes] = field(default_factory=dict)

    def post_update_body(self, body: bytes) -> Any:
        self._look()
        return self.client.post_update_body(body)

    def _look(self) -> None:
        for path in list_files(self.root):
            try:
                self.seen[f"{path} (during the run)"] = path.read_bytes()
            except FileNotFoundError:
                continue  # replaced or removed while we looked


def _error_texts(err: BaseException | None) -> list[str]:
    texts: list[str] = []
    seen: set[int] = set()
    for _ in range(20):  # the chain of causes and contexts, bounded
        if err is None or id(err) in seen:
            break
        seen.add(id(err))
        texts += [str(err), repr(err), repr(vars(err)), "".join(traceback.format_exception(err))]
        err = err.__cause__ or err.__context__
    return texts


def _log_texts(records: list[logging.LogRecord]) -> list[str]:
    texts = []
    for record in records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        texts.append(str(record.msg))
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
        if record.exc_text:
            texts.append(record.exc_text)
    return texts


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)  # the root logger: every logger that propagates
    for name in ("urllib3", "requests", "airflow_provider_stopchurn"):
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


def _frame() -> pd.DataFrame:
    return Churn(31, 300).frame


@pytest.mark.parametrize("path", ["success", "401", "400", "5xx", "quarantine"])
def test_api_key_never_leaks(
    stopchurn_sandbox_factory: Any, tmp_path: Path, debug_logs: pytest.LogCaptureFixture, path: str
) -> None:
    sb: SandboxServer = stopchurn_sandbox_factory(token=KEY if path != "401" else "another-key", record=True)
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, 7, "subscription")
    client = make_client(sb, api_key=KEY, max_retries=2)
    sender = FileWatcher(client, root)
    opts: dict[str, Any] = {"chunk_size": 60, "max_concurrent_requests": 2}
    if path == "400":
        sb.reject_ids({150})
    elif path == "quarantine":
        sb.reject_ids({10, 150})
        opts["on_rejected_rows"] = "quarantine"
    elif path == "5xx":
        sb.set_faults(FaultConfig(error_rate=1.0, html_errors=True))

    expected = {
        "success": None,
        "quarantine": None,
        "401": StopChurnAuthError,
        "400": StopChurnRejectedError,
        "5xx": TransientDeliveryError,
    }[path]
    error: BaseException | None = None
    summary: Any = None
    try:
        summary = run_sync(_frame(), store, sender, options(**opts), run_ms=T0)
    except Exception as exc:
        error = exc
    if expected is None:
        assert error is None, error
    else:
        assert isinstance(error, expected), error
    if path == "quarantine":
        assert summary.quarantined == 2

    places: dict[str, Any] = {
        "repr(client)": repr(client),
        "repr(vars(client))": repr(vars(client)),
        "str(client)": str(client),
        "repr(store)": repr(store),
        "store.location": store.location,
    }
    if summary is not None:
        places["summary"] = json.dumps(summary.as_dict(), default=str)
        places["summary line"] = summary.line()
    for i, text in enumerate(_error_texts(error)):
        places[f"error text {i}"] = text
    for i, text in enumerate(_log_texts(debug_logs.records)):
        places[f"log record {i}"] = text
    places["caplog text"] = debug_logs.text
    for file in list_files(root):
        places[str(file)] = file.read_bytes()
    places.update(sender.seen)

    if path in ("success", "quarantine", "400"):  # these runs commit, so the history holds a record of them
        assert any("/history/" in name for name in places), sorted(places)
    assert debug_logs.records, "nothing was logged: the check would prove nothing"
    assert any(name.endswith("LOCK (during the run)") for name in sender.seen), sorted(sender.seen)
    assert any(name.endswith("PLAN (during the run)") for name in sender.seen), sorted(sender.seen)
    assert any(
        r.levelno == logging.DEBUG and r.name.startswith("airflow_provider_stopchurn") for r in debug_logs.records
    )
    leaked = {where: _leaks(text) for where, text in places.items() if _leaks(text)}
    assert not leaked, leaked


def test_watcher_would_see_a_leak(tmp_path: Path) -> None:
    """The search itself works: a key written into a file or a log line is found."""
    (tmp_path / "f").write_text(f"token={KEY}")
    assert _leaks((tmp_path / "f").read_bytes()) == list(NEEDLES)
    record = logging.LogRecord("x", logging.INFO, "x", 1, "key %s", (KEY,), None)
    assert _leaks(" ".join(_log_texts([record])))
