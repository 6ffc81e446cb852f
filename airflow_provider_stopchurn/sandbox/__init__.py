"""A local server that behaves like StopChurn's documented API.

Use it to run the demo, to test DAGs and this provider without the real service, and to rehearse failures
(500s, 429s, dropped connections, lost acknowledgements, a proxy's 200 HTML pages, 413s above a body size
limit) deterministically::

    from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer

    with SandboxServer(token="demo-key", faults=FaultConfig(seed=1, throttle_rate=0.1)) as sandbox:
        ...  # point a StopChurn connection at sandbox.url
        rows = sandbox.rows(1, "user")

From a shell: ``python -m airflow_provider_stopchurn.sandbox --port 8765 --token demo-key``. In pytest: add
``pytest_plugins = ["airflow_provider_stopchurn.sandbox.pytest_plugin"]`` and use the ``stopchurn_sandbox``
fixture. The package depends only on the standard library and orjson; it never imports Airflow.
"""

from __future__ import annotations

from airflow_provider_stopchurn.sandbox.server import FaultConfig, SandboxServer

__all__ = ["FaultConfig", "SandboxServer"]
