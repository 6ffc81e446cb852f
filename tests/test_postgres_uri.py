"""The ADBC PostgreSQL URI built from an Airflow connection's fields (a pure function), read back by libpq itself.

Each case is checked twice: against the URI text written out here, and against libpq's own parser (psycopg's
``conninfo_to_dict`` calls ``PQconninfoParse``), which must give back every field exactly as the connection holds
it. The password shows only through ``reveal()``.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest

from airflow_provider_stopchurn.source.sql import AIRFLOW_ONLY_EXTRAS, postgres_uri

SECRET = "p@ss:w/rd?#%&= é"

CASES: list[tuple[str, dict[str, Any], str, dict[str, str]]] = [
    (
        "quoted-everything",
        {"host": "db.example.com", "port": 5432, "login": "app user", "password": SECRET, "database": "my db/x"},
        "postgresql://app%20user:p%40ss%3Aw%2Frd%3F%23%25%26%3D%20%C3%A9@db.example.com:5432/my%20db%2Fx",
        {"host": "db.example.com", "port": "5432", "user": "app user", "password": SECRET, "dbname": "my db/x"},
    ),
    (
        "no-password-no-port",
        {"host": "h", "port": None, "login": "app", "password": None, "database": "d"},
        "postgresql://app@h/d",
        {"host": "h", "user": "app", "dbname": "d"},
    ),
    (
        "extras-are-libpq-parameters",
        {
            "host": "h",
            "port": 6432,
            "login": "app",
            "password": "pw",
            "database": "d",
            "extras": {
                "sslmode": "verify-full",
                "sslrootcert": "/etc/ssl/root ca.pem",
                "options": "-c search_path=a,b -c statement_timeout=5min",
                "connect_timeout": 10,
                "application_name": "nightly & co",
                "keepalives": True,
                "cursor": "dictcursor",  # configures the hook, not libpq
                "iam": False,
                "aws_conn_id": "aws_default",
                "target_session_attrs": None,
            },
        },
        "postgresql://app:pw@h:6432/d?sslmode=verify-full&sslrootcert=%2Fetc%2Fssl%2Froot%20ca.pem"
        "&options=-c%20search_path%3Da%2Cb%20-c%20statement_timeout%3D5min&connect_timeout=10"
        "&application_name=nightly%20%26%20co&keepalives=1",
        {
            "host": "h",
            "port": "6432",
            "user": "app",
            "password": "pw",
            "dbname": "d",
            "sslmode": "verify-full",
            "sslrootcert": "/etc/ssl/root ca.pem",
            "options": "-c search_path=a,b -c statement_timeout=5min",
            "connect_timeout": "10",
            "application_name": "nightly & co",
            "keepalives": "1",
        },
    ),
    (
        "hook-options-overridden-by-the-extra",
        {"host": "h", "port": 1, "login": "u", "password": None, "database": "d", "options": "-c a=1"},
        "postgresql://u@h:1/d?options=-c%20a%3D1",
        {"host": "h", "port": "1", "user": "u", "dbname": "d", "options": "-c a=1"},
    ),
    (
        "ipv6",
        {"host": "::1", "port": 5432, "login": "u", "password": None, "database": "d"},
        "postgresql://u@[::1]:5432/d",
        {"host": "::1", "port": "5432", "user": "u", "dbname": "d"},
    ),
    (
        "unix-socket-directory",
        {"host": "/var/run/postgresql", "port": 5433, "login": "u", "password": "pw", "database": "d"},
        "postgresql://u:pw@/d?host=%2Fvar%2Frun%2Fpostgresql&port=5433",
        {"host": "/var/run/postgresql", "port": "5433", "user": "u", "password": "pw", "dbname": "d"},
    ),
    (
        "several-hosts",
        {"host": "a.example, b.example", "port": 5432, "login": "u", "password": None, "database": "d"},
        "postgresql://u@a.example:5432,b.example:5432/d",
        {"host": "a.example,b.example", "port": "5432,5432", "user": "u", "dbname": "d"},
    ),
    (
        "nothing-but-defaults",
        {"host": None, "port": None, "login": None, "password": None, "database": None},
        "postgresql:///",
        {},
    ),
]


@pytest.mark.parametrize(("name", "fields", "uri", "parsed"), CASES, ids=[case[0] for case in CASES])
def test_uri_from_connection_fields(name: str, fields: dict[str, Any], uri: str, parsed: dict[str, str]) -> None:
    fields = dict(fields)
    if name == "hook-options-overridden-by-the-extra":
        fields["extras"] = {"options": "-c a=1"}
        fields["options"] = "-c hook=1"
    built = postgres_uri(**fields)
    assert built.reveal() == uri
    from psycopg.conninfo import conninfo_to_dict  # (the PostgreSQL provider brings psycopg; not in every lock)

    assert conninfo_to_dict(built.reveal()) == parsed


def test_the_password_shows_only_through_reveal() -> None:
    uri = postgres_uri(
        host="h", port=5432, login="u", password=SECRET, database="d", extras={"sslpassword": "key-secret"}
    )
    quoted = "p%40ss%3Aw%2Frd%3F%23%25%26%3D%20%C3%A9"
    assert quoted in uri.reveal() and "key-secret" in uri.reveal()
    for text in (str(uri), repr(uri), f"{uri}", uri.redacted):
        assert SECRET not in text and quoted not in text and "key-secret" not in text
        assert "***" in text
    assert str(uri) == "postgresql://u:***@h:5432/d?sslpassword=***"
    message = f"could not parse {uri.reveal()!r}: bad token {quoted} near {SECRET}, key key-secret"
    scrubbed = uri.scrub(message)
    assert SECRET not in scrubbed and quoted not in scrubbed and "key-secret" not in scrubbed
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(uri)
    with pytest.raises(TypeError, match="cannot be pickled"):
        copy.deepcopy(uri)


def test_the_hook_only_extras_are_postgres_hooks() -> None:
    """PostgresHook passes every other extra to libpq; the URI must drop exactly the ones it drops."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    assert set(PostgresHook.ignored_extra_options) == AIRFLOW_ONLY_EXTRAS
