"""Every Airflow name the provider uses, imported where the running Airflow release keeps it.

The provider supports Airflow 3.0 to 3.3 (README: "Supported Airflow versions"). The task SDK (``airflow.sdk``)
gained names release by release; where an older release lacks one, it comes from where that release keeps it:

======================================  ==========================  =============================
name                                    Airflow 3.2 and newer       older
======================================  ==========================  =============================
``AirflowException``                    ``airflow.sdk.exceptions``  ``airflow.exceptions``
``AirflowFailException``                ``airflow.sdk.exceptions``  ``airflow.exceptions`` (3.1, 3.0)
``BaseHook``                            ``airflow.sdk``             ``airflow.hooks.base`` (3.0)
``BaseOperator``, ``ObjectStoragePath``,  ``airflow.sdk``           ``airflow.sdk`` (every 3.x)
``Variable``, ``XComArg``, ``Context``
======================================  ==========================  =============================

On 3.1 and 3.0 the classes in ``airflow.exceptions`` are the ones the task runner catches (``airflow.sdk``'s
``AirflowException`` is the same class there), so a failure raised through these names fails the task without
retry exactly as on 3.3.

This is the only module of the package that chooses between Airflow releases; the hook and the operator import
Airflow names from here. It lives in ``hooks/`` because only ``hooks/`` and ``operators/`` may import Airflow
and operators already depend on hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperator, Context, ObjectStoragePath, Variable, XComArg

if TYPE_CHECKING:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
else:
    try:
        from airflow.sdk import BaseHook
    except ImportError:  # Airflow 3.0
        from airflow.hooks.base import BaseHook
    try:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException
    except ImportError:  # Airflow 3.0 and 3.1
        from airflow.exceptions import AirflowException, AirflowFailException

__all__ = [
    "AirflowException",
    "AirflowFailException",
    "BaseHook",
    "BaseOperator",
    "Context",
    "ObjectStoragePath",
    "Variable",
    "XComArg",
]
