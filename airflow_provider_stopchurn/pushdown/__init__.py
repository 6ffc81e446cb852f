"""The warehouse diff's former import path, kept for code written against it: use :mod:`.warehouse` instead.

Importing it warns (``DeprecationWarning``) and gives the same names as :mod:`airflow_provider_stopchurn.warehouse`.
"""

from __future__ import annotations

import warnings

from airflow_provider_stopchurn import warehouse as _warehouse
from airflow_provider_stopchurn.warehouse import *  # noqa: F403 - the same names, at the former path

warnings.warn(
    "airflow_provider_stopchurn.pushdown moved to airflow_provider_stopchurn.warehouse; import it from there.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = list(_warehouse.__all__)
