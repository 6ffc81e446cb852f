"""HTTP client of the StopChurn API (no Airflow import).

One :class:`StopChurnClient` wraps one ``requests.Session`` (keep-alive, a connection pool sized for a few
dozen concurrent senders) and knows the API's contract:

* every request carries ``Authorization: Bearer <key>``, ``Content-Type: application/json`` and a
  ``User-Agent`` naming this provider; TLS verification stays on; plain ``http://`` is accepted only for a
  loopback host (a local sandbox);
* only StopChurn's acknowledgement is success: a 200 whose body is a JSON object with ``"statusCode": 200``
  (``{"statusCode": 200, "message": "Updates received"}``). Any other 200 (a proxy's or a web site's HTML
  page, an empty body, other JSON) means something else answered: it is retried like a 5xx, and its message
  quotes the start of the body and says the base URL may be wrong;
* 401 raises :class:`~airflow_provider_stopchurn.exceptions.StopChurnAuthError`, 400 raises
  :class:`~airflow_provider_stopchurn.exceptions.StopChurnRejectedError` (StopChurn's message verbatim), 413
  raises :class:`~airflow_provider_stopchurn.exceptions.StopChurnPayloadTooLargeError` (the caller may split
  the body), any other status outside 408/429/5xx raises
  :class:`~airflow_provider_stopchurn.exceptions.StopChurnHTTPError`; none of them is retried;
* 408, 429, 5xx, unacknowledged 200s and network errors (connection refused/reset, timeouts, truncated
  bodies) are retried with exponential backoff and full jitter, honouring ``Retry-After``; when retries run
  out, :class:`~airflow_provider_stopchurn.exceptions.TransientDeliveryError` says how many attempts were made
  and what the last one got;
* a 429 slows down every thread that uses the same client (a shared :class:`Pacer`), not only the thread that
  received it;
* a *fence* (:meth:`StopChurnClient.fenced`) is called before every attempt, retries included, with the longest
  time the attempt can take (:attr:`StopChurnClient.request_s`): the sync engines pass their table lock's
  :meth:`~airflow_provider_stopchurn.store.lock.TableLock.fence`, so a run that lost its lease while it slept
  on a ``Retry-After`` or a backoff sends nothing more.

The API key is kept in a masked wrapper: it never appears in a repr, a log line or an exception message
(a response body that echoes it, as a misconfigured echo service would, is quoted with the key masked).
"""

from __future__ import annotations

import copy
import email.utils
import html
import ipaddress
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from airflow_provider_stopchurn import __version__
from airflow_provider_stopchurn.exceptions import (
    DeliveryError,
    SourceDataError,
    StopChurnAuthError,
    StopChurnConfigError,
    StopChurnError,
    StopChurnHTTPError,
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
    TransientDeliveryError,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "Fence",
    "Pacer",
    "SendResult",
    "StopChurnClient",
    "fence_sender",
    "safe_netloc",
    "safe_url",
]

#: Called before every HTTP attempt with the longest time that attempt can take (seconds); raises to stop it.
Fence = Callable[[float], None]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://marketplace.stopchurn.com"
UPDATE_PATH = "/client-data/update"
EVENT_PATH = "/client-data/event"
USER_AGENT = f"airflow-provider-stopchurn/{__version__}"
POOL_MAXSIZE = 32

_RETRYABLE_EXCEPTIONS: tuple[type[Exception], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
#: Statuses retried besides 5xx: 408 Request Timeout and 429 Too Many Requests.
_RETRYABLE_STATUSES = frozenset({408, 429})
_EXCERPT_CHARS = 200
_QUOTE_BYTES = 200  # how much of an unexpected 200 body an error message quotes
_SCRIPT_STYLE_RE = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG_RE = re.compile(r"<[^>]*>")
_SPACE_RE = re.compile(r"\s+")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


@dataclass(frozen=True)
class SendResult:
    """Outcome of one accepted request.

    :param status: HTTP status of the final attempt (200).
    :param message: StopChurn's ``message`` (e.g. ``"Updates received"``), or a short excerpt of the body.
    :param attempts: how many HTTP attempts the request took (1 when nothing was retried).
    :param waited_s: seconds spent waiting between attempts (backoff, ``Retry-After``, shared pacing).
    """

    status: int
    message: str
    attempts: int
    waited_s: float


class _Secret:
    """Holds a secret string; its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret ***>"

    __str__ = __repr__


class Pacer:
    """A thread-safe "not before" time shared by every thread that sends through one client.

    When StopChurn answers 429, the thread that got it calls :meth:`defer`; every thread then calls
    :meth:`wait` before its next request, so the whole sender slows down instead of one worker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._not_before = 0.0  # time.monotonic() value

    def defer(self, seconds: float) -> None:
        """Hold every request back for at least ``seconds`` from now (never shortens an earlier hold)."""
        until = time.monotonic() + max(0.0, seconds)
        with self._lock:
            self._not_before = max(self._not_before, until)

    def remaining(self) -> float:
        """Seconds until requests may go out again (0.0 when they may go now)."""
        with self._lock:
            not_before = self._not_before
        return max(0.0, not_before - time.monotonic())

    def wait(self) -> float:
        """Block until the hold (if any) has passed; return the seconds slept.

        Another thread may extend the hold while this one sleeps; the loop follows it a bounded number of
        times.
        """
        slept = 0.0
        for _ in range(64):
            delay = self.remaining()
            if delay <= 0.0:
                break
            start = time.monotonic()
            time.sleep(delay)
            slept += time.monotonic() - start
        return slept

    def __repr__(self) -> str:
        return f"Pacer(remaining={self.remaining():.3f}s)"


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def safe_netloc(url: str) -> str:
    """``host:port`` of a URL, without user info (``user:password@``); ``""`` when it has no host."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ":<invalid port>"
    return _printable(host + port) if host else ""


def safe_url(url: str | None) -> str:
    """A URL as errors and logs may quote it: ``scheme://host:port/path`` only.

    User info, query and fragment can carry secrets (``https://user:token@host/?key=...``) that Airflow's log
    masking does not know (it masks only the connection's password): they are never rendered. A text without
    ``scheme://`` is rendered as its path with anything up to an ``@`` dropped.
    """
    text = (url or "").strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        return "<an unparseable URL>"
    path = parts.path.rpartition("@")[2] if not parts.netloc else parts.path
    if not parts.netloc:
        path = path.split("?", 1)[0].split("#", 1)[0]
        return _printable(path) or "<an empty URL>"
    scheme = _printable(parts.scheme.lower())
    return f"{scheme}://{safe_netloc(text)}{_printable(path)}"


def normalize_base_url(base_url: str | None) -> str:
    """Validate and normalise a base URL: trailing ``/`` stripped, empty -> production URL.

    ``https://`` is required, except ``http://`` for a loopback host (127.0.0.0/8, ::1, localhost). Raises
    :class:`StopChurnConfigError` otherwise.
    """
    url = (base_url or "").strip().rstrip("/")
    if not url:
        return DEFAULT_BASE_URL
    shown = safe_url(url)  # never quote user info, a query or a fragment (they may hold secrets)
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        raise StopChurnConfigError(
            f"Invalid StopChurn base URL {shown}: its host or port cannot be read (the port must be a number from "
            "0 to 65535)"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise StopChurnConfigError(
            f"StopChurn base URL must start with https:// (got {shown}), e.g. {DEFAULT_BASE_URL}"
        )
    if parts.username is not None or parts.password is not None:
        raise StopChurnConfigError(
            f"StopChurn base URL must not carry credentials ({shown}): put the API key in the password field"
        )
    if not host:
        raise StopChurnConfigError(f"StopChurn base URL {shown} has no host")
    if parts.query or parts.fragment:
        raise StopChurnConfigError(
            f"StopChurn base URL {shown} must not have a query (?...) or a fragment (#...): give scheme://host/path"
        )
    if scheme == "http" and not _is_loopback(host):
        raise StopChurnConfigError(
            f"Refusing plain http:// for {safe_netloc(url)}: the API key would travel unencrypted. Use https:// "
            "(http:// is accepted only for a loopback host such as 127.0.0.1, ::1 or localhost)."
        )
    return url


def _validate_key(api_key: str | None) -> str:
    key = (api_key or "").strip()
    if not key:
        raise StopChurnConfigError("The StopChurn API key is empty")
    # A header value with control characters or non-latin-1 text makes requests raise an error that quotes
    # the whole header (the key included): refuse it here with a message that does not.
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key) or not key.isascii():
        raise StopChurnConfigError(
            "The StopChurn API key contains control or non-ASCII characters; paste it again without them"
        )
    return key


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


def _printable(text: str) -> str:
    """``text`` with every non-printable character (controls, line breaks, bidi marks) as an escape."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _quote_start(raw: bytes) -> str:
    """The size and the first ``_QUOTE_BYTES`` bytes of a body, decoded leniently and made printable."""
    if not raw:
        return "an empty body"
    head = _printable(raw[:_QUOTE_BYTES].decode("utf-8", errors="replace"))
    more = "..." if len(raw) > _QUOTE_BYTES else ""
    return f'{len(raw)} bytes starting "{head}"{more}'


class _Answer(NamedTuple):
    """What a response body says.

    ``message``: StopChurn's ``message`` or None; ``described``: a printable description of the body;
    ``acknowledged``: the body is a JSON object whose ``statusCode`` is 200 (StopChurn's acknowledgement).
    """

    message: str | None
    described: str
    acknowledged: bool


def _read_answer(raw: bytes) -> _Answer:
    text = raw.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text) if text.strip() else None
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return _Answer(None, _excerpt(text), False)
    status_code = payload.get("statusCode")
    acknowledged = type(status_code) is int and status_code == 200
    message = payload.get("message")
    if isinstance(message, str):
        return _Answer(message, message, acknowledged)
    if isinstance(message, list) and all(isinstance(m, str) for m in message):
        joined = "; ".join(message)
        return _Answer(joined, joined, acknowledged)
    return _Answer(None, _excerpt(text), acknowledged)


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None when absent or invalid."""
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


def _encode(payload: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise SourceDataError(f"The request body cannot be encoded as JSON: {exc}") from None


class StopChurnClient:
    """Client of StopChurn's ``/client-data/update`` and ``/client-data/event`` routes.

    The constructor does no I/O. The client is thread-safe: many threads may call :meth:`post_update_body`
    at once; they share one connection pool and one :class:`Pacer`.

    :param base_url: API base URL; empty means ``https://marketplace.stopchurn.com``. ``http://`` is refused
        unless the host is loopback.
    :param api_key: StopChurn API key, sent as a Bearer token.
    :param conn_id: Airflow connection id, named in error messages (optional).
    :param timeout: read timeout of one attempt, in seconds.
    :param connect_timeout: connect timeout of one attempt, in seconds.
    :param max_retries: retries after the first attempt on 408, 429, 5xx, unacknowledged 200s and network
        errors.
    :param backoff_base: first backoff ceiling; attempt ``n`` waits ``uniform(0, backoff_base * 2**n)``.
    :param backoff_max: cap of one backoff wait.
    :param retry_after_max: cap applied to a server's ``Retry-After``.
    :param max_total_wait: stop retrying when the cumulative wait of one request would exceed this.
    :param session: a ``requests.Session`` to use (its owner closes it); by default the client creates and
        owns one, with a pool of ``POOL_MAXSIZE`` connections.
    :param pacer: a :class:`Pacer` to share with other clients; by default each client has its own.
    """

    def __init__(  # noqa: PLR0913 - keyword-only connection settings, each with a default
        self,
        base_url: str,
        api_key: str,
        *,
        conn_id: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        retry_after_max: float = 120.0,
        max_total_wait: float = 600.0,
        session: requests.Session | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.conn_id = conn_id
        self._key = _Secret(_validate_key(api_key))
        for name, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not value > 0:
                raise StopChurnConfigError(f"{name} must be > 0 (got {value!r})")
        for name, value in (
            ("backoff_base", backoff_base),
            ("backoff_max", backoff_max),
            ("retry_after_max", retry_after_max),
            ("max_total_wait", max_total_wait),
        ):
            if not value >= 0:
                raise StopChurnConfigError(f"{name} must be >= 0 (got {value!r})")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise StopChurnConfigError(f"max_retries must be an integer >= 0 (got {max_retries!r})")
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_retries = max_retries
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.retry_after_max = float(retry_after_max)
        self.max_total_wait = float(max_total_wait)
        self.pacer = pacer if pacer is not None else Pacer()
        self._rng = random.Random()
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_MAXSIZE, max_retries=0)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        self._session = session
        self._fence: Fence | None = None

    @property
    def request_s(self) -> float:
        """The longest time one attempt is given: the connect timeout plus the read timeout."""
        return self.connect_timeout + self.timeout

    def fenced(self, fence: Fence) -> StopChurnClient:
        """A view of this client that calls ``fence(request_s)`` before every HTTP attempt, retries included.

        The view shares this client's session, pacer and key (closing it closes nothing); an exception from
        ``fence`` (a lost table lock) is raised as it is and nothing more is sent for that request.
        """
        view = copy.copy(self)
        view._owns_session = False
        view._fence = fence
        return view

    # --- public API -----------------------------------------------------------------------------------------
    def post_updates(self, updates: Sequence[Mapping[str, Any]]) -> SendResult:
        """POST ``{"data": updates}`` to ``/client-data/update``; return the accepted request's result."""
        return self._post(UPDATE_PATH, _encode({"data": list(updates)}))

    def post_update_body(self, body: bytes) -> SendResult:
        """POST an already-encoded JSON body ``{"data": [...]}`` to ``/client-data/update`` as it is."""
        return self._post(UPDATE_PATH, body)

    def post_events(self, events: Sequence[Mapping[str, Any]]) -> SendResult:
        """POST ``{"data": events}`` to ``/client-data/event``; return the result of the accepted request."""
        return self._post(EVENT_PATH, _encode({"data": list(events)}))

    def post_event_body(self, body: bytes) -> SendResult:
        """POST an already-encoded JSON body ``{"data": [...]}`` to ``/client-data/event`` as it is."""
        return self._post(EVENT_PATH, body)

    def check_api_key(self) -> tuple[bool, str]:
        """Check the API key with one request that changes nothing: ``{"data": []}`` to the update route.

        Returns ``(True, message)`` on StopChurn's acknowledgement and ``(False, explanation)`` otherwise: a 401
        is reported as a refused key (naming the connection), anything else (other status, a 200 that is not
        StopChurn's acknowledgement, network error, timeout) with what happened. The check makes a single
        attempt (no retries) and never raises for an HTTP outcome.
        """
        try:
            result = self._post(UPDATE_PATH, b'{"data":[]}', max_retries=0)
        except StopChurnAuthError as exc:
            return False, str(exc)
        except DeliveryError as exc:
            what = f"HTTP {exc.status}" if exc.status is not None else "no HTTP answer"
            return False, f"Could not verify the API key at {safe_url(self.base_url)} ({what}): {exc}"
        except StopChurnError as exc:
            return False, str(exc)
        return True, f"StopChurn accepted the API key at {safe_url(self.base_url)} ({result.status}: {result.message})"

    def close(self) -> None:
        """Close the session (only when the client created it)."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> StopChurnClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={safe_url(self.base_url)!r}, conn_id={self.conn_id!r})"

    # --- internals ------------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._key.reveal()}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }

    def _backoff(self, retry_index: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_base * (2.0**retry_index))
        return self._rng.uniform(0.0, ceiling) if ceiling > 0 else 0.0

    def _where(self) -> str:
        return f" (connection '{self.conn_id}')" if self.conn_id else ""

    def _post(self, path: str, body: bytes, *, max_retries: int | None = None) -> SendResult:  # noqa: PLR0915 - one retry loop, read top to bottom
        url = self.base_url + path
        retries = self.max_retries if max_retries is None else max_retries
        total_attempts = retries + 1
        waited = 0.0
        last = "no attempt"
        last_status: int | None = None
        stop_reason = ""
        for attempt in range(1, total_attempts + 1):
            waited += self.pacer.wait()
            if self._fence is not None:
                self._fence(self.request_s)  # after any wait: the lease may have moved while this thread slept
            started = time.monotonic()
            retry_after: float | None = None
            try:
                response = self._session.post(
                    url,
                    data=body,
                    headers=self._headers(),
                    timeout=(self.connect_timeout, self.timeout),
                    allow_redirects=False,
                )
            except requests.exceptions.SSLError:
                raise StopChurnHTTPError(
                    f"TLS verification failed for {safe_url(self.base_url)}{self._where()}; check the base URL",
                    status=None,
                    attempts=attempt,
                ) from None
            except _RETRYABLE_EXCEPTIONS as exc:
                last_status = None
                last = f"{type(exc).__name__} (network error)"
                log.debug(
                    "POST %s attempt %d/%d: %s after %.3fs, %d bytes",
                    path,
                    attempt,
                    total_attempts,
                    type(exc).__name__,
                    time.monotonic() - started,
                    len(body),
                )
            except requests.exceptions.RequestException as exc:
                raise StopChurnHTTPError(
                    f"Request to {safe_url(url)}{self._where()} failed: {type(exc).__name__}",
                    status=None,
                    attempts=attempt,
                ) from None
            else:
                status = response.status_code
                raw = self._mask(response.content or b"")
                answer = _read_answer(raw)
                log.debug(
                    "POST %s attempt %d/%d: HTTP %d after %.3fs, %d bytes sent, %d bytes received",
                    path,
                    attempt,
                    total_attempts,
                    status,
                    time.monotonic() - started,
                    len(body),
                    len(raw),
                )
                if status == 200 and answer.acknowledged:
                    return SendResult(
                        status=status,
                        message=answer.message if answer.message is not None else answer.described,
                        attempts=attempt,
                        waited_s=waited,
                    )
                if status == 200:
                    last = self._not_acknowledged(response, raw)
                elif status in _RETRYABLE_STATUSES or 500 <= status <= 599:
                    last = f"HTTP {status}: {answer.described}"
                else:
                    raise self._permanent_error(status, answer, attempt, len(body))
                last_status = status
                retry_after = _parse_retry_after(response.headers.get("Retry-After"))

            if attempt >= total_attempts:
                stop_reason = "no retries left"
                break
            delay = self._backoff(attempt - 1) if retry_after is None else min(retry_after, self.retry_after_max)
            if waited + delay > self.max_total_wait:
                stop_reason = f"the next wait of {delay:.1f}s would exceed max_total_wait={self.max_total_wait:g}s"
                break
            if last_status is None:
                short = last
            elif last_status == 200:
                short = "HTTP 200 without StopChurn's acknowledgement"
            else:
                short = f"HTTP {last_status}"
            log.warning(
                "StopChurn POST %s attempt %d/%d failed (%s); retrying in %.2fs",
                path,
                attempt,
                total_attempts,
                short,
                delay,
            )
            if last_status == 429:
                self.pacer.defer(delay)  # slows down every thread of this client, this one included
            else:
                time.sleep(delay)
                waited += delay
        attempts_made = attempt
        raise TransientDeliveryError(
            f"StopChurn did not accept POST {path}{self._where()} after {attempts_made} "
            f"attempt{'s' if attempts_made != 1 else ''}.\nLast answer: {last}\n{waited:.1f}s waited; {stop_reason}.",
            status=last_status,
            attempts=attempts_made,
        )

    def _mask(self, raw: bytes) -> bytes:
        """``raw`` with every occurrence of the API key replaced by ``***`` (a body may echo the request)."""
        key = self._key.reveal().encode("ascii")
        return raw.replace(key, b"***") if key in raw else raw

    def _not_acknowledged(self, response: requests.Response, raw: bytes) -> str:
        """Describe a 200 that is not StopChurn's acknowledgement (``raw``: the body, key already masked)."""
        content_type = response.headers.get("Content-Type", "").replace(self._key.reveal(), "***")
        content_type = _printable(content_type[:100])
        return (
            f"HTTP 200 without StopChurn's acknowledgement (a JSON object with statusCode 200); got "
            f"{content_type or 'no Content-Type'}, {_quote_start(raw)}. The base URL {safe_url(self.base_url)} may be "
            f"wrong: something other than StopChurn's API (a web site, a proxy) answered; StopChurn's API host "
            f"is e.g. {DEFAULT_BASE_URL}"
        )

    def _permanent_error(self, status: int, answer: _Answer, attempt: int, body_bytes: int) -> DeliveryError:
        message, described = answer.message, answer.described
        if status == 401:
            return StopChurnAuthError(
                f"StopChurn refused the API key (401: {described}){self._where()}. Check the connection's "
                "API key (password field).",
                status=status,
                attempts=attempt,
            )
        if status == 400:
            reason = message if message is not None else described
            return StopChurnRejectedError(
                f"StopChurn rejected the request (400){self._where()}: {reason}",
                reason=reason,
                status=status,
                attempts=attempt,
            )
        if status == 413:
            return StopChurnPayloadTooLargeError(
                f"StopChurn refused a request body of {body_bytes} bytes as too large (413){self._where()}: "
                f"{described}. Send smaller chunks.",
                status=status,
                attempts=attempt,
            )
        hint = ""
        if status in (403, 404):
            hint = " Check the base URL and the key's permissions."
        elif 300 <= status < 400:
            hint = " Redirects are not followed: check the base URL."
        return StopChurnHTTPError(
            f"StopChurn answered HTTP {status}{self._where()}: {described}.{hint}",
            status=status,
            attempts=attempt,
        )


class _FencedSender:
    """Calls a fence before each body it hands to a sender that offers no :meth:`StopChurnClient.fenced`."""

    def __init__(self, sender: Any, fence: Fence) -> None:
        self._sender = sender
        self._fence = fence
        self.request_s = float(getattr(sender, "request_s", 0.0) or 0.0)

    def post_update_body(self, body: bytes) -> Any:
        self._fence(self.request_s)
        return self._sender.post_update_body(body)

    def post_event_body(self, body: bytes) -> Any:
        self._fence(self.request_s)
        return self._sender.post_event_body(body)

    def __repr__(self) -> str:
        return f"fenced({self._sender!r})"


def fence_sender(sender: Any, fence: Fence) -> Any:
    """``sender`` with ``fence`` called before every request: before every HTTP attempt for a
    :class:`StopChurnClient` (its :meth:`~StopChurnClient.fenced` view), else before each body it is given (its
    own retries, if any, are out of reach).
    """
    fenced = getattr(sender, "fenced", None)
    if callable(fenced):
        return fenced(fence)
    return _FencedSender(sender, fence)
