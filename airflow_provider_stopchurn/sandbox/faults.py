"""Fault injection: which faults the sandbox injects and how often (:class:`FaultConfig`), the seeded draw
that picks one per request, and the answer each fault gives.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson

from airflow_provider_stopchurn.sandbox.responses import _DROP, _error_response, _json_response, _Response

FAULT_KINDS = ("error", "throttle", "drop", "drop_after_apply", "slow", "html_ok", "failing_id")

_HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>500 Internal Server Error</title></head>\n"
    b"<body><h1>500 Internal Server Error</h1><p>The server encountered an internal error.</p>"
    b"</body></html>\n"
)
#: What a captive portal, a proxy or a web site at the wrong base URL answers: 200 and a page, not JSON.
_HTML_OK_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Welcome</title></head>\n"
    b"<body><h1>Welcome</h1><p>This page is served by a proxy, not by the API you asked for.</p>"
    b"</body></html>\n"
)


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Which faults the sandbox injects, and how often.

    Every rate is the share (0.0 to 1.0) of StopChurn API requests that get that fault; the rates are
    exclusive bands of one random draw per request, so their sum must not exceed 1. Draws come from
    ``random.Random(seed)`` in request-arrival order, so a sequential client sees the same fault sequence
    for the same seed. Faults never apply to the ``/_sandbox/`` inspection API.

    Attributes:
        seed: seed of the random generator that picks faults.
        error_rate: answered ``500`` (JSON body, or an HTML page when ``html_errors``); nothing applied.
        throttle_rate: answered ``429`` with ``Retry-After: <retry_after>``; nothing applied.
        retry_after: seconds sent in ``Retry-After`` (an integer when whole, else a decimal).
        drop_rate: the connection is closed without any response; nothing applied.
        drop_after_apply_rate: processed normally (applied when valid), then the connection is closed
            without a response: a lost acknowledgement.
        slow_rate: the request sleeps ``slow_seconds`` before being processed normally.
        slow_seconds: the delay of a slow request.
        latency: seconds added to every API request (simulates a real network).
        html_errors: send injected 500s as an HTML page instead of JSON.
        html_ok_rate: answered ``200`` with ``Content-Type: text/html`` and an HTML page, as a proxy or a web
            site at the wrong base URL would (no authentication check); nothing applied.
        max_body_bytes: a request body larger than this many bytes is answered ``413`` with
            ``{"statusCode": 413, "message": "Payload too large", "error": "Payload Too Large"}``; nothing
            applied. Deterministic, not a rate: it is checked when the body is read, before queued responses
            and faults, and takes no random draw. ``None`` (the default) means no limit.
    """

    seed: int = 0
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    retry_after: float = 1.0
    drop_rate: float = 0.0
    drop_after_apply_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 2.0
    latency: float = 0.0
    html_errors: bool = False
    html_ok_rate: float = 0.0
    max_body_bytes: int | None = None

    def __post_init__(self) -> None:
        if type(self.seed) is not int:
            raise ValueError(f"FaultConfig.seed must be an integer, got {self.seed!r}")
        if type(self.html_errors) is not bool:
            raise ValueError(f"FaultConfig.html_errors must be a boolean, got {self.html_errors!r}")
        if self.max_body_bytes is not None and (type(self.max_body_bytes) is not int or self.max_body_bytes < 0):
            raise ValueError(
                f"FaultConfig.max_body_bytes must be None or a non-negative integer, got {self.max_body_bytes!r}"
            )
        for name in ("error_rate", "throttle_rate", "drop_rate", "drop_after_apply_rate", "slow_rate", "html_ok_rate"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultConfig.{name} must be a number between 0 and 1, got {value!r}")
        for name in ("retry_after", "slow_seconds", "latency"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < 86400.0:
                raise ValueError(f"FaultConfig.{name} must be a non-negative number of seconds, got {value!r}")
        if sum(rate for _, rate in self._bands()) > 1.0 + 1e-9:
            raise ValueError("FaultConfig: the fault rates must not add up to more than 1")

    def _bands(self) -> tuple[tuple[str, float], ...]:
        return (
            ("error", self.error_rate),
            ("throttle", self.throttle_rate),
            ("drop", self.drop_rate),
            ("drop_after_apply", self.drop_after_apply_rate),
            ("slow", self.slow_rate),
            ("html_ok", self.html_ok_rate),
        )

    @property
    def injects_faults(self) -> bool:
        """Whether any fault rate is above zero (``max_body_bytes`` is not a rate and does not count)."""
        return any(rate > 0.0 for _, rate in self._bands())

    @property
    def retry_after_header(self) -> str:
        """The ``Retry-After`` header value: an integer when whole, else a decimal."""
        value = float(self.retry_after)
        return str(int(value)) if value.is_integer() else repr(value)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dictionary (the shape ``PUT /_sandbox/faults`` accepts)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultConfig:
        """Build a configuration from a mapping; absent keys keep their defaults, unknown keys are refused.

        Raises:
            ValueError: on an unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FaultConfig field(s): {', '.join(unknown)}")
        return cls(**dict(data))


def _is_real(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]  # excludes bool


def draw_fault(faults: FaultConfig, rng: random.Random) -> str | None:
    """The fault of one request: one draw of ``rng`` that falls in a rate's band, or none.

    :param faults: the configuration whose rates are the bands.
    :param rng: the seeded generator; one draw per call, so the sequence follows the request order.
    :return: the fault kind, or ``None`` when the draw falls past every band.
    """
    draw = rng.random()
    for kind, rate in faults._bands():
        if draw < rate:
            return kind
        draw -= rate
    return None


def fault_response(fault: str, faults: FaultConfig) -> _Response:
    """The answer of a fault that replaces the request's processing (``error``, ``throttle``, ``drop``,
    ``html_ok``); ``slow`` and ``drop_after_apply`` process the request and are handled by the caller.

    :param fault: the drawn fault kind.
    :param faults: the configuration in force (HTML errors, ``Retry-After``).
    :return: the response to write; ``status == 0`` closes the connection without one.
    """
    if fault == "error":
        if faults.html_errors:
            return _Response(500, _HTML_ERROR_PAGE, "text/html; charset=utf-8")
        return _error_response(500, "Internal server error")
    if fault == "throttle":
        return _json_response(
            429,
            {"statusCode": 429, "message": "Too Many Requests", "error": "Too Many Requests"},
            (("Retry-After", faults.retry_after_header),),
        )
    if fault == "drop":
        return _DROP
    if fault == "html_ok":
        return _Response(200, _HTML_OK_PAGE, "text/html; charset=utf-8")
    raise ValueError(f"fault {fault!r} does not replace the processing of its request")


def scripted_response(
    status: int,
    body: bytes | str | dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> _Response:
    """The response :meth:`SandboxServer.queue_response` scripts (see there for the arguments).

    :param status: HTTP status to send, or ``0`` to close the connection without a response.
    :param body: bytes as they are, text (UTF-8), a dict (sent as JSON) or nothing.
    :param headers: extra response headers; a ``Content-Type`` here replaces the default one.
    :return: the response, ready to queue.
    """
    if status != 0 and not 100 <= status <= 599:
        raise ValueError(f"status must be 0 (drop) or an HTTP status code, got {status!r}")
    content_type: str | None
    if body is None:
        payload, content_type = b"", None
    elif isinstance(body, bytes):
        payload, content_type = body, "application/octet-stream"
    elif isinstance(body, str):
        payload, content_type = body.encode(), "text/plain; charset=utf-8"
    elif isinstance(body, dict):
        payload, content_type = orjson.dumps(body), "application/json"
    else:
        raise TypeError("body must be bytes, str, dict or None")
    extra: list[tuple[str, str]] = []
    for name, value in (headers or {}).items():
        if name.lower() == "content-type":
            content_type = str(value)
        elif name.lower() not in ("content-length", "connection"):
            extra.append((str(name), str(value)))
    response = _DROP if status == 0 else _Response(status, payload, content_type, tuple(extra))
    return response
