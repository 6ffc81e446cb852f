"""Reading StopChurn's answers: what counts as an acknowledgement, which answers are retried, which raise what.

* Only StopChurn's acknowledgement is success: a 200 whose body is a JSON object with ``"statusCode": 200``
  (``{"statusCode": 200, "message": "Updates received"}``). Any other 200 (a proxy's or a web site's HTML page,
  an empty body, other JSON) means something else answered: it is retried like a 5xx, and its message quotes the
  start of the body and says the base URL may be wrong.
* 408, 429 and 5xx are retried (:func:`retryable_status`), honouring ``Retry-After``
  (:func:`parse_retry_after`).
* Any other status is permanent (:func:`permanent_error`): 401 raises
  :class:`~airflow_provider_stopchurn.exceptions.StopChurnAuthError`, 400
  :class:`~airflow_provider_stopchurn.exceptions.StopChurnRejectedError` (StopChurn's message verbatim), 413
  :class:`~airflow_provider_stopchurn.exceptions.StopChurnPayloadTooLargeError` (the caller may split the body),
  the rest :class:`~airflow_provider_stopchurn.exceptions.StopChurnHTTPError`.

Every function here takes bodies and headers with the API key already masked (the transport masks them).
"""

from __future__ import annotations

import email.utils
import html
import json
import math
import re
import time
from typing import NamedTuple

from airflow_provider_stopchurn.api.urls import DEFAULT_BASE_URL, printable, safe_url
from airflow_provider_stopchurn.exceptions import (
    DeliveryError,
    StopChurnAuthError,
    StopChurnHTTPError,
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
)

__all__ = [
    "Answer",
    "describe_unacknowledged",
    "parse_retry_after",
    "permanent_error",
    "read_answer",
    "retryable_status",
]

#: Statuses retried besides 5xx: 408 Request Timeout and 429 Too Many Requests.
_RETRYABLE_STATUSES = frozenset({408, 429})
_EXCERPT_CHARS = 200
_QUOTE_BYTES = 200  # how much of an unexpected 200 body an error message quotes
_SCRIPT_STYLE_RE = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG_RE = re.compile(r"<[^>]*>")
_SPACE_RE = re.compile(r"\s+")


class Answer(NamedTuple):
    """What a response body says.

    ``message``: StopChurn's ``message`` or None; ``described``: a printable description of the body;
    ``acknowledged``: the body is a JSON object whose ``statusCode`` is 200 (StopChurn's acknowledgement).
    """

    message: str | None
    described: str
    acknowledged: bool


def retryable_status(status: int) -> bool:
    """Whether an HTTP status other than 200 is worth another attempt: 408, 429 and 5xx."""
    return status in _RETRYABLE_STATUSES or 500 <= status <= 599


def _excerpt(text: str) -> str:
    """A short, single-line, tag-free excerpt of a response body (HTML error pages included)."""
    text = _SCRIPT_STYLE_RE.sub(" ", text)
    text = _TAG_RE.sub(" ", text)
    text = _SPACE_RE.sub(" ", html.unescape(text)).strip()
    if not text:
        return "<empty body>"
    if len(text) > _EXCERPT_CHARS:
        return text[:_EXCERPT_CHARS].rstrip() + "..."
    return text


def _quote_start(raw: bytes) -> str:
    """The size and the first ``_QUOTE_BYTES`` bytes of a body, decoded leniently and made printable."""
    if not raw:
        return "an empty body"
    head = printable(raw[:_QUOTE_BYTES].decode("utf-8", errors="replace"))
    more = "..." if len(raw) > _QUOTE_BYTES else ""
    return f'{len(raw)} bytes starting "{head}"{more}'


def read_answer(raw: bytes) -> Answer:
    """What the body ``raw`` says: StopChurn's message, a printable description, whether it acknowledges.

    :param raw: the response body, the API key already masked.
    """
    text = raw.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text) if text.strip() else None
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return Answer(None, _excerpt(text), False)
    status_code = payload.get("statusCode")
    acknowledged = type(status_code) is int and status_code == 200
    message = payload.get("message")
    if isinstance(message, str):
        return Answer(message, message, acknowledged)
    if isinstance(message, list) and all(isinstance(m, str) for m in message):
        joined = "; ".join(message)
        return Answer(joined, joined, acknowledged)
    return Answer(None, _excerpt(text), acknowledged)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None when absent or invalid.

    :param value: the header's value, or None when the answer has none.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def describe_unacknowledged(content_type: str, raw: bytes, base_url: str) -> str:
    """Describe a 200 that is not StopChurn's acknowledgement, saying the base URL may be wrong.

    :param content_type: the answer's ``Content-Type`` header (``""`` when absent), the API key already masked.
    :param raw: the body, the API key already masked.
    :param base_url: the client's base URL (quoted without user info, query or fragment).
    """
    content_type = printable(content_type[:100])
    return (
        f"HTTP 200 without StopChurn's acknowledgement (a JSON object with statusCode 200); got "
        f"{content_type or 'no Content-Type'}, {_quote_start(raw)}. The base URL {safe_url(base_url)} may be "
        f"wrong: something other than StopChurn's API (a web site, a proxy) answered; StopChurn's API host "
        f"is e.g. {DEFAULT_BASE_URL}"
    )


def permanent_error(status: int, answer: Answer, attempt: int, body_bytes: int, where: str) -> DeliveryError:
    """The error a status that is neither an acknowledgement nor retryable raises (never retried).

    :param status: the HTTP status.
    :param answer: what the body says (:func:`read_answer`).
    :param attempt: the number of the attempt that got this answer (1 for the first).
    :param body_bytes: the size of the request body (named by a 413's message).
    :param where: ``" (connection '<id>')"`` naming the Airflow connection, or ``""``.
    """
    message, described = answer.message, answer.described
    if status == 401:
        return StopChurnAuthError(
            f"StopChurn refused the API key (401: {described}){where}. Check the connection's API key (password "
            "field).",
            status=status,
            attempts=attempt,
        )
    if status == 400:
        reason = message if message is not None else described
        return StopChurnRejectedError(
            f"StopChurn rejected the request (400){where}: {reason}",
            reason=reason,
            status=status,
            attempts=attempt,
        )
    if status == 413:
        return StopChurnPayloadTooLargeError(
            f"StopChurn refused a request body of {body_bytes} bytes as too large (413){where}: {described}. Send "
            "smaller chunks.",
            status=status,
            attempts=attempt,
        )
    hint = ""
    if status in (403, 404):
        hint = " Check the base URL and the key's permissions."
    elif 300 <= status < 400:
        hint = " Redirects are not followed: check the base URL."
    return StopChurnHTTPError(
        f"StopChurn answered HTTP {status}{where}: {described}.{hint}",
        status=status,
        attempts=attempt,
    )
