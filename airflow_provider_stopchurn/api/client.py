"""StopChurnClient: the public methods that send updates and events to StopChurn and check the API key.

One :class:`StopChurnClient` is a :class:`~airflow_provider_stopchurn.api.transport.Transport` (one
``requests.Session``, the masked key, retries, backoff, the shared pacer and the fence) that knows StopChurn's two
routes, ``POST /client-data/update`` and ``POST /client-data/event``. What StopChurn's answers mean (only its
acknowledgement is success; 401, 400 and 413 raise at once) is :mod:`~airflow_provider_stopchurn.api.answers`'
job; which base URLs are accepted, :mod:`~airflow_provider_stopchurn.api.urls`'.

The API key never appears in a repr, a log line or an exception message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from airflow_provider_stopchurn.api.transport import Fence, SendResult, Transport
from airflow_provider_stopchurn.api.urls import safe_url
from airflow_provider_stopchurn.exceptions import DeliveryError, SourceDataError, StopChurnAuthError, StopChurnError

__all__ = ["EVENT_PATH", "UPDATE_PATH", "StopChurnClient", "fence_sender"]

UPDATE_PATH = "/client-data/update"
EVENT_PATH = "/client-data/event"


def _encode(payload: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise SourceDataError(f"The request body cannot be encoded as JSON: {exc}") from None


class StopChurnClient(Transport):
    """Client of StopChurn's ``/client-data/update`` and ``/client-data/event`` routes.

    The constructor does no I/O. The client is thread-safe: many threads may call :meth:`post_update_body`
    at once; they share one connection pool and one :class:`~airflow_provider_stopchurn.api.transport.Pacer`.
    It is a context manager: leaving the ``with`` block closes the session it created.

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
    :param pacer: a :class:`~airflow_provider_stopchurn.api.transport.Pacer` to share with other clients; by
        default each client has its own.
    """

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={safe_url(self.base_url)!r}, conn_id={self.conn_id!r})"


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

    :param sender: a :class:`StopChurnClient`, or any object with ``post_update_body`` and ``post_event_body``.
    :param fence: called with the longest time a request can take; raises to stop it.
    """
    fenced = getattr(sender, "fenced", None)
    if callable(fenced):
        return fenced(fence)
    return _FencedSender(sender, fence)
