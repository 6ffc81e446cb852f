"""A local-mode Apache Spark session for the test suite (a pytest plugin module).

``spark`` (session scope): ``local[2]``, no UI, 2 shuffle partitions, session time zone UTC (what
``SparkWarehouse`` expects), a 512 MB driver, the in-memory catalog, and its warehouse, scratch, Derby and
metastore directories under a pytest temporary directory, so nothing is written to the repository. Stopped at
the end of the session. Starting it takes about 10 s on two cores (the JVM), so it is started once.

Without pyspark or a ``java`` (``$JAVA_HOME/bin/java``, else on ``PATH``), or when the JVM does not start, the
Spark tests are skipped with the reason, unless ``STOPCHURN_REQUIRE_SPARK=1`` is set: then the fixture fails, so
that CI cannot pass without them.

A test module uses it with ``pytest_plugins = ["spark_session"]``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse

REQUIRE_ENV = "STOPCHURN_REQUIRE_SPARK"

log = logging.getLogger(__name__)


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but Spark cannot run: {reason}", pytrace=False)
    pytest.skip(f"Spark unavailable: {reason}")


def find_java() -> str | None:
    """The ``java`` pyspark's launcher would run: ``$JAVA_HOME/bin/java`` when JAVA_HOME is set, else ``PATH``'s."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None
    return shutil.which("java")


def spark_conf(base: Path) -> dict[str, str]:
    """The session's settings, with every directory it writes under ``base``."""
    return {
        "spark.master": "local[2]",
        "spark.app.name": "stopchurn-tests",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "2",
        "spark.default.parallelism": "2",
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.memory": "512m",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.sql.catalogImplementation": "in-memory",
        "spark.sql.warehouse.dir": str(base / "warehouse"),
        "spark.local.dir": str(base / "scratch"),
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={base / 'derby'} -Djava.io.tmpdir={base / 'scratch'}",
        # only read if a test enables Hive support: its Derby metastore stays under base too
        "spark.hadoop.javax.jdo.option.ConnectionURL": f"jdbc:derby:;databaseName={base / 'metastore_db'};create=true",
        # Python workers (UDFs, mapInArrow), if any test starts one, run this interpreter (it has pyarrow)
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
    }


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkSession]:
    """A running local-mode SparkSession shared by the whole test session."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as err:
        _unavailable(f"pyspark is not installed ({err})")
        raise  # unreachable: _unavailable skips or fails
    if find_java() is None:
        where = "$JAVA_HOME/bin/java" if os.environ.get("JAVA_HOME") else "java on PATH"
        _unavailable(f"no {where} (Spark 4 needs Java 17 or later)")
    base = tmp_path_factory.mktemp("spark")
    (base / "scratch").mkdir()
    builder = SparkSession.builder
    for key, value in spark_conf(base).items():
        builder = builder.config(key, value)
    # Python workers (UDFs, mapInArrow), if a test starts one, run the interpreter PYSPARK_PYTHON names, read when
    # the context starts (spark.pyspark.python is only read by spark-submit): this one, which has pyarrow
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # py4j logs at INFO from __del__ at interpreter exit, after pytest closed its streams ("Logging error")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    started = time.monotonic()
    try:
        session = builder.getOrCreate()
    except Exception as err:  # the JVM did not start (wrong Java version, no loopback, ...)
        _unavailable(f"the Spark session did not start: {err}")
        raise  # unreachable: _unavailable skips or fails
    session.sparkContext.setLogLevel("ERROR")
    log.info("Spark session started in %.1f s", time.monotonic() - started)
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture
def spark_warehouse(spark: SparkSession) -> Iterator[SparkWarehouse]:
    """A warehouse on the shared session, closed after the test."""
    from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse

    wh = SparkWarehouse(spark)
    try:
        yield wh
    finally:
        wh.close()
