"""The one error tree of the provider (no Airflow import).

Every error says whether retrying the same work later could succeed:

* ``permanent = True``: bad configuration, bad source data, a safeguard, a rejected request (400), a wrong
  API key (401), a body too large (413: the same body never fits, though a caller may split it and send the
  halves). Retrying the same work cannot help; the operator maps these to ``AirflowFailException``.
* ``permanent = False``: exhausted retries on 408/429/5xx/network errors or on a 200 that is not StopChurn's
  acknowledgement, a busy lock, a source database that could not be reached. A task retry resumes the unfinished
  plan; the operator maps these to ``AirflowException``.

The tree (``permanent`` in brackets)::

    StopChurnError                          [True]
    +-- StopChurnConfigError (ValueError)   [True]
    +-- SourceDataError (ValueError)        [True]
    +-- SourceConnectionError               [False]
    +-- SafeguardError                      [True]
    +-- SnapshotError                       [True]
    |   `-- SnapshotLockedError             [False]
    `-- DeliveryError                       [True]  .status, .attempts
        +-- StopChurnAuthError              [True]  401
        +-- StopChurnRejectedError          [True]  400, .reason
        +-- StopChurnPayloadTooLargeError   [True]  413
        +-- StopChurnHTTPError              [True]  any other non-retryable status
        `-- TransientDeliveryError          [False] retries exhausted

No exception text ever contains the API key: messages are built only from StopChurn's response ``message``
(or the start of a response body, with the key masked), status codes, counts, column names and connection ids.
Nor a source database's password: a failed connection's message has it taken out.
"""

from __future__ import annotations


class StopChurnError(Exception):
    """Base of every error raised by this provider."""

    permanent: bool = True


# --- configuration -------------------------------------------------------------------------------------------
class StopChurnConfigError(StopChurnError, ValueError):
    """Invalid configuration: missing API key or brand id, insecure base URL, bad operator arguments."""


# --- source data ---------------------------------------------------------------------------------------------
class SourceDataError(StopChurnError, ValueError):
    """The source table cannot be delivered as it is (keys, value types, row size, table contract)."""


class SourceConnectionError(StopChurnError):
    """The source database could not be reached (the driver's message, without the password); a retry may succeed."""

    permanent = False


class SafeguardError(StopChurnError):
    """A plan tripped a safeguard (mass delete, empty source, schema drift); nothing was sent."""


# --- snapshot store ------------------------------------------------------------------------------------------
class SnapshotError(StopChurnError):
    """The snapshot store is unreadable, corrupt, of a newer format, or not writable."""


class SnapshotLockedError(SnapshotError):
    """Another run holds the lock of this brand/table; retrying later may succeed."""

    permanent = False


# --- delivery ------------------------------------------------------------------------------------------------
class DeliveryError(StopChurnError):
    """StopChurn did not accept a request."""

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class StopChurnAuthError(DeliveryError):
    """401: the API key was refused. Never retried."""


class StopChurnRejectedError(DeliveryError):
    """400: StopChurn rejected the request; ``reason`` is StopChurn's ``message`` verbatim. Never retried."""

    def __init__(self, message: str, *, reason: str, status: int | None = 400, attempts: int = 1) -> None:
        super().__init__(message, status=status, attempts=attempts)
        self.reason = reason


class StopChurnPayloadTooLargeError(DeliveryError):
    """413: StopChurn (or a proxy in front of it) refused the request body as too large. Never retried.

    Permanent for the client, which cannot change the body; a caller that built the body from several updates
    may split it and send the halves.
    """


class StopChurnHTTPError(DeliveryError):
    """Any other non-retryable HTTP status (403, 404, other 4xx, unexpected 2xx/3xx)."""


class TransientDeliveryError(DeliveryError):
    """408/429/5xx, network errors or unacknowledged 200s persisted through every retry; a later retry may succeed.

    ``status`` is the HTTP status of the last attempt (``None`` after a network error; ``200`` when the last
    answer was a 200 without StopChurn's acknowledgement).
    """

    permanent = False
