"""Fixture factories of the operator tests: a module assigns what it needs (``brand = brand_fixture(300)``,
``sandbox = sandbox_fixture(...)``, ``memory_fs = memory_fs_fixture(...)``) instead of writing the fixture again."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pytest
from airflow_plugin import point_stopchurn_default


def sandbox_fixture(brand: int | None = None, *, token: str | None = None, **extra: Any) -> Any:
    """A ``sandbox`` fixture: a sandbox of the test's own with ``stopchurn_default`` pointing at it.

    Assign it in a test module (``sandbox = sandbox_fixture(42)``).

    :param brand: the brand the connection names (None: the module's ``brand`` fixture's).
    :param token: the API key the sandbox accepts and the connection holds (None: the sandbox fixtures' own).
    :param extra: more extras of the connection (see :func:`point_stopchurn_default`).
    """

    @pytest.fixture
    def sandbox(airflow_conn: Callable[..., None], request: pytest.FixtureRequest) -> Any:
        if token is None:
            server = request.getfixturevalue("stopchurn_sandbox")
        else:
            server = request.getfixturevalue("stopchurn_sandbox_factory")(token=token)
        brand_id = request.getfixturevalue("brand") if brand is None else brand
        return point_stopchurn_default(airflow_conn, server, brand_id, **extra)

    return sandbox


def brand_fixture(first: int, name: str = "brand") -> Any:
    """A ``brand`` fixture: a brand of its own for each test of the module, counting from ``first``, so stores
    under the shared AIRFLOW_HOME never collide.

    Assign it in a test module (``brand = brand_fixture(300)``); modules count from different numbers.

    :param first: the first test's brand.
    :param name: the fixture's name.
    """
    brands = itertools.count(first)

    @pytest.fixture(name=name)
    def brand() -> int:
        return next(brands)

    return brand


def memory_fs_fixture(folder: str) -> Any:
    """A ``memory_fs`` fixture: fsspec's memory filesystem, attached to Airflow's object storage for the test, and
    ``folder`` (the test's files) removed from it afterwards.

    Assign it in a test module (``memory_fs = memory_fs_fixture("/stopchurn-e2e")``).

    :param folder: the folder the module's tests write under.
    """

    @pytest.fixture
    def memory_fs() -> Iterator[Any]:
        from airflow.sdk.io import attach

        fs = fsspec.filesystem("memory")
        attach("memory", fs=fs)
        yield fs
        if fs.exists(folder):
            fs.rm(folder, recursive=True)

    return memory_fs
