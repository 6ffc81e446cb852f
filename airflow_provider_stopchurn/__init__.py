"""Apache Airflow provider that keeps StopChurn tables in step with your own data."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
