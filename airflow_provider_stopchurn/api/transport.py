"""Sending one request body to StopChurn: the session, the masked key, timeouts, retries, backoff and pacing.

:class:`Transport` wraps one ``requests.Session`` (keep-alive, a connection pool sized for a few dozen concurrent
senders); :class:`~airflow_provider_stopchurn.api.client.StopChurnClient` adds the routes on top of it.

* every request carries ``Authorization: Bearer <key>``, ``Content-Type: application/json`` and a ``User-Agent``
  naming this provider; TLS verification stays on; redirects are not followed;
* 408, 429, 5xx, unacknowledged 200s and network errors (connection refused/reset, timeouts, truncated bodies)
  are retried with exponential backoff and full jitter, honouring ``Retry-After``; when retries run out,
  :class:`~airflow_provider_stopchurn.exceptions.TransientDeliveryError` says how many attempts were made and what
  the last one got (what an answer means is :mod:`~airflow_provider_stopchurn.api.answers`' job);
* a 429 slows down every thread that uses the same transport (a shared :class:`Pacer`), not only the thread that
  received it;
* a *fence* (:meth:`Transport.fenced`) is called before every attempt, retries included, with the longest time
  the attempt can take (:attr:`Transport.request_s`): the sync engines pass their table lock's
  :meth:`~airflow_provider_stopchurn.store.lock.TableLock.fence`, so a run that lost its lease while it slept on a
  ``Retry-After`` or a backoff sends nothing more.

The API key is kept in a masked wrapper: it never appears in a repr, a log line or an exception message (a
response body or header that echoes it, as a misconfigured echo service would, is read with the key masked).
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import requests
from requests.adapters import HTTPAdapter

from airflow_provider_stopchurn import __version__
from airflow_provider_stopchurn.api.answers import (
    describe_unacknowledged,
    parse_retry_after,
    permanent_error,
    read_answer,
    retryable_status,
)
from airflow_provider_stopchurn.api.closing import ClosedByWith
from airflow_provider_stopchurn.api.urls import normalize_base_url, safe_url
from airflow_provider_stopchurn.exceptions import StopChurnConfigError, StopChurnHTTPError, TransientDeliveryError

__all__ = ["POOL_MAXSIZE", "USER_AGENT", "Fence", "Pacer", "SendResult", "Transport"]

#: Called before every HTTP attempt with the longest time that attempt can take (seconds); raises to stop it.
Fence = Callable[[float], None]

# The client's log records keep the logger name users and tests filter on.
log = logging.getLogger("airflow_provider_stopchurn.api.client")

USER_AGENT = f"airflow-provider-stopchurn/{__version__}"
POOL_MAXSIZE = 32

_RETRYABLE_EXCEPTIONS: tuple[type[Exception], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


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


class Transport(ClosedByWith):
    """POSTs request bodies to one StopChurn base URL with retries; thread-safe, the constructor does no I/O.

    Its arguments are those of :class:`~airflow_provider_stopchurn.api.client.StopChurnClient`, documented there.
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

    def fenced(self, fence: Fence) -> Self:
        """A view of this client that calls ``fence(request_s)`` before every HTTP attempt, retries included.

        The view shares this client's session, pacer and key (closing it closes nothing); an exception from
        ``fence`` (a lost table lock) is raised as it is and nothing more is sent for that request.

        :param fence: called with :attr:`request_s` before every attempt; raises to stop the request.
        """
        view = copy.copy(self)
        view._owns_session = False
        view._fence = fence
        return view

    def close(self) -> None:
        """Close the session (only when the client created it)."""
        if self._owns_session:
            self._session.close()

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
                answer = read_answer(raw)
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
                    content_type = response.headers.get("Content-Type", "").replace(self._key.reveal(), "***")
                    last = describe_unacknowledged(content_type, raw, self.base_url)
                elif retryable_status(status):
                    last = f"HTTP {status}: {answer.described}"
                else:
                    raise permanent_error(status, answer, attempt, len(body), self._where())
                last_status = status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))

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
