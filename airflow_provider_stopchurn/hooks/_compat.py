"""Every Airflow name the provider uses, imported where the running Airflow release keeps it.

The provider supports Airflow 3.1 to 3.3 (docs: "Supported Airflow versions"). The task SDK (``airflow.sdk``)
gained names release by release; where an older release lacks one, it comes from where that release keeps it:

=====================================================  =============================  ========================
name                                                   Airflow 3.2 and newer          Airflow 3.1
=====================================================  =============================  ========================
``AirflowException``, ``AirflowFailException``         ``airflow.sdk.exceptions``     ``airflow.exceptions``
``BaseHook``, ``BaseOperator``, ``ObjectStoragePath``,  ``airflow.sdk``                ``airflow.sdk``
``Variable``, ``XComArg``, ``Context``
=====================================================  =============================  ========================

On 3.1 the exception classes in ``airflow.exceptions`` are the ones its task runner catches (``airflow.sdk``'s
``AirflowException`` is the same class there), so an ``AirflowFailException`` raised through these names fails
the task without retry exactly as on 3.3. (Airflow 3.0 would also need ``BaseHook`` from ``airflow.hooks.base``;
it is not supported.)

This is the only module of the package that chooses between Airflow releases: the hook and the operator import
Airflow names from here. It lives in ``hooks/`` because only ``hooks/`` and ``operators/`` may import Airflow,
and operators already depend on hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseHook, BaseOperator, Context, ObjectStoragePath, Variable, XComArg

if TYPE_CHECKING:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
else:
    try:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException
    except ImportError:  # Airflow 3.1
        from airflow.exceptions import AirflowException, AirflowFailException

try:
    from airflow.sdk.log import mask_secret
except ImportError:  # Airflow 3.1
    from airflow.sdk.execution_time.secrets_masker import mask_secret  # type: ignore[no-redef]

__all__ = [
    "AirflowException",
    "AirflowFailException",
    "BaseHook",
    "BaseOperator",
    "Context",
    "ObjectStoragePath",
    "Variable",
    "XComArg",
    "mask_secret",
]
