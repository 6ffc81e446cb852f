"""Airflow hook of the StopChurn API: an Airflow connection turned into a :class:`StopChurnClient`."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.api.transport import SendResult
from airflow_provider_stopchurn.api.urls import DEFAULT_BASE_URL, safe_netloc, safe_url
from airflow_provider_stopchurn.exceptions import StopChurnConfigError
from airflow_provider_stopchurn.get_provider_info import get_provider_info
from airflow_provider_stopchurn.hooks._compat import BaseHook

__all__ = ["StopChurnHook"]

# Connection-form fields (``conn-fields`` in get_provider_info). Airflow 3's UI stores their values in the
# connection extra under the plain name ("brand_id"); connections made by older UIs or by hand may use the
# legacy prefixed form ("extra__stopchurn__brand_id"). Both are read; the plain name wins.
_EXTRA_PREFIX = "extra__stopchurn__"

#: extra -> (form label, integer?, minimum: inclusive for integers, exclusive for seconds). The form's fields are text
#: fields, so that what is typed reaches the hook and a bad value is refused naming its field (a number field
#: would save "abc" as null and clamp "-1" silently).
_NUMBER_EXTRAS: dict[str, tuple[str, bool, int]] = {
    "brand_id": ("Brand id", True, 1),
    "timeout": ("Timeout (seconds)", False, 0),
    "max_retries": ("Max retries", True, 0),
}
_DEFAULT_PORTS = {"https": 443, "http": 80}


class StopChurnHook(BaseHook):
    """Interact with the StopChurn API through an Airflow connection of type ``stopchurn``.

    The connection holds:

    * **host** - API base URL. Empty means ``https://marketplace.stopchurn.com``; a host given without a
      scheme is taken as ``https://`` (or the connection's ``schema`` when it is ``http``/``https``).
      ``http://`` is refused unless the host is loopback (a local sandbox).
    * **password** - the StopChurn API key (sent as a Bearer token; never logged).
    * **port** - optional; the scheme's own port (443 for https) is left out of the URL. Airflow 3.3.2's Test
      button needs a stored port (it sends 0 for an empty one and its API refuses the test), hence the form
      asks for 443.
    * **extra** - optional ``brand_id`` (an integer >= 1), ``timeout`` (read timeout in seconds, > 0; the
      connect timeout is ``min(10, timeout)``), ``max_retries`` (retries on 429/5xx/network errors, an integer
      >= 0). Strings are accepted (the form's fields are text); any other value is an error naming the field.

    Arguments given to the hook override the connection's extras. The constructor does no I/O; the client is
    built on first use of :attr:`client` and cached.

    :param stopchurn_conn_id: Airflow connection id (default ``stopchurn_default``).
    :param base_url: overrides the connection's host.
    :param timeout: overrides the ``timeout`` extra (read timeout of one attempt, seconds).
    :param max_retries: overrides the ``max_retries`` extra.
    :param session: a ``requests.Session`` for the client to use (for tests or custom adapters).
    :param client_kwargs: further keyword arguments of :class:`StopChurnClient` (``connect_timeout``,
        ``backoff_base``, ``backoff_max``, ``retry_after_max``, ``max_total_wait``, ``pacer``).
    """

    conn_name_attr = "stopchurn_conn_id"
    default_conn_name = "stopchurn_default"
    conn_type = "stopchurn"
    hook_name = "StopChurn"

    def __init__(
        self,
        stopchurn_conn_id: str = default_conn_name,
        *,
        base_url: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        session: requests.Session | None = None,
        **client_kwargs: Any,
    ) -> None:
        super().__init__()
        self.stopchurn_conn_id = stopchurn_conn_id
        self.base_url = base_url
        self.timeout = timeout
        self.max_retries = max_retries
        self.session = session
        self.client_kwargs = client_kwargs
        self._testing = False

    # --- connection form of Airflow 3.1 ----------------------------------------------------------------------
    # Airflow 3.2+ builds the form from ``conn-fields`` / ``ui-field-behaviour`` in get_provider_info and never
    # calls these two methods. Airflow 3.1 calls them instead; both are derived from the same declaration.
    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Hidden, relabelled and placeholder fields of the connection form (Airflow 3.1)."""
        behaviour = _connection_type_info()["ui-field-behaviour"]
        return {
            "hidden_fields": list(behaviour["hidden-fields"]),
            "relabeling": dict(behaviour["relabeling"]),
            "placeholders": dict(behaviour["placeholders"]),
        }

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """The extra fields of the connection form as WTForms fields (Airflow 3.1).

        Their values are stored in the connection extra under the plain field name, as on Airflow 3.2+. The
        imports are Airflow's usual ones for this method; its UI supplies stand-ins when FAB is not installed.
        """
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import IntegerField, StringField
        from wtforms.validators import Optional

        widgets: dict[str, Any] = {}
        for name, spec in _connection_type_info()["conn-fields"].items():
            # A number that may be fractional has no WTForms field Airflow accepts: it is entered as text.
            field = IntegerField if "integer" in spec["schema"]["type"] else StringField
            widgets[name] = field(
                lazy_gettext(spec["label"]),
                widget=BS3TextFieldWidget(),
                validators=[Optional()],
                description=spec.get("description", ""),
            )
        return widgets

    # --- connection -----------------------------------------------------------------------------------------
    @functools.cached_property
    def _connection_extras(self) -> dict[str, Any]:
        return dict(self._connection.extra_dejson or {})

    @functools.cached_property
    def _connection(self) -> Any:
        return self.get_connection(self.stopchurn_conn_id)

    def _extra(self, name: str) -> Any:
        extras = self._connection_extras
        value = extras.get(name)
        if value is None or value == "":
            value = extras.get(_EXTRA_PREFIX + name)
        if isinstance(value, str):
            value = value.strip()
        return None if value in (None, "") else value

    def _number_extra(self, name: str) -> Any:
        """The extra ``name`` checked against :data:`_NUMBER_EXTRAS`; None when unset, an error naming it if bad."""
        return self._number_extras(name)[name]

    def _number_extras(self, *names: str) -> dict[str, Any]:
        """The extras ``names`` checked together: their values (None when unset), or one error naming every bad one.

        One problem is one line; several start with a short line naming the fields, then one line per problem, so
        that one Test shows everything to fix.
        """
        values: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        for name in names:
            value = self._extra(name)
            number = None if value is None else _checked_number(name, value)
            if value is not None and number is None:
                label, integer, minimum = _NUMBER_EXTRAS[name]
                kind = f"an integer >= {minimum}" if integer else f"a number of seconds > {minimum}"
                problems.append((name, f"{label} (extra {name!r}) must be {kind}, got {self._shown(value)}."))
            values[name] = number
        if len(problems) == 1:
            raise StopChurnConfigError(f"{self._label()}: {problems[0][1]}")
        if problems:
            fields = ", ".join(name for name, _ in problems)
            lines = "\n".join(f"- {problem}" for _, problem in problems)
            raise StopChurnConfigError(f"{self._label()}: {len(problems)} extras are invalid ({fields}).\n{lines}")
        return values

    def _shown(self, value: Any) -> str:
        """``value`` as an error message may quote it: never the API key (pasted into the wrong field), never long."""
        password = str(self._connection.password or "").strip()
        text = str(value).strip()
        # the whole key, or a part of it (the form's length cap cuts a pasted key short)
        if len(password) >= 4 and (password in text or (len(text) >= 8 and text in password)):
            return "the API key (not shown)"
        text = repr(value)
        return text if len(text) <= 40 else f"{text[:37]}..."

    def _label(self) -> str:
        # The form's Test button tests a copy of the connection under a random temporary id: name none then.
        return "The connection" if self._testing else f"Connection {self.stopchurn_conn_id!r}"

    def _resolve_base_url(self) -> str:
        if self.base_url is not None:
            return self.base_url
        conn = self._connection
        host = (conn.host or "").strip()
        if not host:
            return DEFAULT_BASE_URL
        if "://" not in host:
            schema = (conn.schema or "").strip().lower()
            host = f"{schema if schema in ('http', 'https') else 'https'}://{host}"
        port = conn.port
        parts = urlsplit(host)
        # The scheme's own port is left out (the form asks for 443 so that Airflow 3.3.2's Test button works).
        if port and int(port) != _DEFAULT_PORTS.get(parts.scheme.lower()):
            try:
                has_port = parts.port is not None
            except ValueError:
                has_port = True  # let the client report the malformed URL
            if not has_port:
                host = parts._replace(netloc=f"{parts.netloc}:{int(port)}").geturl()
        return host

    @property
    def api_host(self) -> str:
        """The host (and port) of the API base URL, as ``stopchurn://`` assets and lineage name it."""
        return safe_netloc(self._resolve_base_url())  # never user info: asset names are shown everywhere

    @property
    def brand_id(self) -> int | None:
        """The connection's default brand id (extra ``brand_id``), or None when it is not set."""
        value: int | None = self._number_extra("brand_id")
        return value

    @functools.cached_property
    def client(self) -> StopChurnClient:
        """The :class:`StopChurnClient` of this connection (built on first use, then cached)."""
        return self._new_client()

    def _new_client(self) -> StopChurnClient:
        conn = self._connection
        password = conn.password
        if not password or not str(password).strip():
            raise StopChurnConfigError(
                f"{self._label()} has no StopChurn API key: set it in the connection's password (API key) field."
            )
        if len(str(password)) >= 5:  # Airflow's masker ignores (and warns about) shorter secrets
            try:
                from airflow.sdk.log import mask_secret

                mask_secret(str(password))
            except Exception:  # noqa: S110 - masking is best effort outside a task
                pass
        extras = self._number_extras(
            *(name for name, given in (("timeout", self.timeout), ("max_retries", self.max_retries)) if given is None)
        )
        timeout = self.timeout if self.timeout is not None else extras["timeout"]
        max_retries = self.max_retries if self.max_retries is not None else extras["max_retries"]
        kwargs: dict[str, Any] = dict(self.client_kwargs)
        if timeout is not None:
            kwargs["timeout"] = float(timeout)
            kwargs.setdefault("connect_timeout", min(10.0, float(timeout)))
        if max_retries is not None:
            kwargs["max_retries"] = int(max_retries)
        return StopChurnClient(
            self._resolve_base_url(),
            str(password),
            conn_id=None if self._testing else self.stopchurn_conn_id,
            session=self.session,
            **kwargs,
        )

    def get_conn(self) -> StopChurnClient:
        """Return the cached :class:`StopChurnClient` (same as :attr:`client`)."""
        return self.client

    # --- API ------------------------------------------------------------------------------------------------
    def send_updates(self, updates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Send table updates to ``POST /client-data/update`` in one request.

        Each update is ``{"type": "insert"|"update"|"delete", "data": {"brandId", "tableName", "data",
        "createdAt", "updatedAt"}}`` (see StopChurn's docs); the body sent is ``{"data": updates}``. 429, 5xx
        and network errors are retried with backoff; 400 and 401 are not.

        :return: ``{"status": 200, "message": "Updates received", "attempts": <n>}``.
        :raises StopChurnAuthError: 401, the API key was refused.
        :raises StopChurnRejectedError: 400; ``reason`` is StopChurn's message.
        :raises StopChurnPayloadTooLargeError: 413, the body is too large.
        :raises StopChurnHTTPError: another non-retryable status.
        :raises TransientDeliveryError: retries exhausted on 408/429/5xx/network errors, or a 200 that is not
            StopChurn's acknowledgement.
        """
        result = self.client.post_updates(updates)
        return {"status": result.status, "message": result.message, "attempts": result.attempts}

    def send_update_body(self, body: bytes) -> SendResult:
        """Send an already-encoded JSON body ``{"data": [...]}`` to ``POST /client-data/update`` unchanged.

        Same errors and retries as :meth:`send_updates`.
        """
        return self.client.post_update_body(body)

    def send_events(self, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Send user events to ``POST /client-data/event`` in one request.

        Each event is ``{"brandId": <int>, "userId": "<string>", "name": "<event name>", "value": <optional>}``
        (see StopChurn's docs); the body sent is ``{"data": events}``. Retries and errors as :meth:`send_updates`.
        Nothing here records what was sent: a request whose answer is lost and retried may be applied twice.
        ``StopChurnEventOperator`` adds the ledger that sends each event once.

        :return: ``{"status": 200, "message": "Events received", "attempts": <n>}``.
        """
        result = self.client.post_events(events)
        return {"status": result.status, "message": result.message, "attempts": result.attempts}

    def send_event_body(self, body: bytes) -> SendResult:
        """Send an already-encoded JSON body ``{"data": [...]}`` to ``POST /client-data/event`` unchanged."""
        return self.client.post_event_body(body)

    def test_connection(self) -> tuple[bool, str]:
        """Check the connection's extras, base URL and API key without changing anything at StopChurn.

        The extras are checked first, all of them: every invalid ``brand_id``, ``timeout`` or ``max_retries`` is
        reported in one message naming its field (a short first line, then one line per problem). Then one
        ``POST /client-data/update`` with an empty data array (``{"data": []}``), which carries no update. 200
        means the key works; 401 is reported as a refused API key; anything else (another status, a network error,
        a configuration error such as a missing key or an insecure URL) is reported with what happened. Messages
        do not name the connection id: Airflow's Test tests a copy of the connection under a random temporary id.
        Never raises.
        """
        self._testing = True
        try:
            self._number_extras(*_NUMBER_EXTRAS)  # every bad extra in one message
            client = self._new_client()
            try:
                return client.check_api_key()
            finally:
                client.close()
        except StopChurnConfigError as exc:
            return False, str(exc)
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        finally:
            self._testing = False

    def __repr__(self) -> str:
        shown = None if self.base_url is None else safe_url(self.base_url)
        return f"{type(self).__name__}(stopchurn_conn_id={self.stopchurn_conn_id!r}, base_url={shown!r})"


def _checked_number(name: str, value: Any) -> int | float | None:
    """``value`` of extra ``name`` as the number :data:`_NUMBER_EXTRAS` asks for, or None when it is not one."""
    _, integer, minimum = _NUMBER_EXTRAS[name]
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    valid = (
        math.isfinite(number)
        and (number.is_integer() if integer else True)
        and (number >= minimum if integer else number > minimum)
    )
    if not valid:
        return None
    return int(number) if integer else number


def _connection_type_info() -> dict[str, Any]:
    """The ``stopchurn`` entry of ``connection-types`` in the provider info."""
    [info] = [c for c in get_provider_info()["connection-types"] if c["connection-type"] == StopChurnHook.conn_type]
    return dict(info)
