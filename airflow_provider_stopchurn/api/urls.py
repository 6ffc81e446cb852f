"""StopChurn's base URL: which ones are accepted, and how a URL is quoted without the secrets it may carry.

``https://`` is required; plain ``http://`` is accepted only for a loopback host (a local sandbox), because the
API key would otherwise travel unencrypted. Errors and logs quote a URL as ``scheme://host:port/path`` only:
user info, a query and a fragment can hold secrets that Airflow's log masking does not know.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from airflow_provider_stopchurn.exceptions import StopChurnConfigError

__all__ = ["DEFAULT_BASE_URL", "normalize_base_url", "printable", "safe_netloc", "safe_url"]

DEFAULT_BASE_URL = "https://marketplace.stopchurn.com"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def printable(text: str) -> str:
    """``text`` with every non-printable character (controls, line breaks, bidi marks) as an escape."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


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
    return printable(host + port) if host else ""


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
        return printable(path) or "<an empty URL>"
    scheme = printable(parts.scheme.lower())
    return f"{scheme}://{safe_netloc(text)}{printable(path)}"


def normalize_base_url(base_url: str | None) -> str:
    """Validate and normalise a base URL: trailing ``/`` stripped, empty -> production URL.

    ``https://`` is required, except ``http://`` for a loopback host (127.0.0.0/8, ::1, localhost). Raises
    :class:`~airflow_provider_stopchurn.exceptions.StopChurnConfigError` otherwise.

    :param base_url: the base URL as configured (the connection's host), or None.
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
