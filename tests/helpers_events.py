"""The event stream most event tests send: deposits, one ``DEPOSIT`` event per ``deposit_id`` for its ``user_id``,
valued by ``amount``."""

from __future__ import annotations

from typing import Any

from airflow_provider_stopchurn.events.options import EventOptions

DEPOSITS: dict[str, Any] = {
    "user_id_column": "user_id",
    "name": "DEPOSIT",
    "value_column": "amount",
    "event_key": ("deposit_id",),
}


def deposit_options(brand_id: int, **kwargs: Any) -> EventOptions:
    """The deposits stream's options for ``brand_id``; ``kwargs`` add options or replace those of :data:`DEPOSITS`.

    :param brand_id: the brand the events go to.
    :param kwargs: more :class:`EventOptions` fields.
    """
    return EventOptions(brand_id=brand_id, **{**DEPOSITS, **kwargs})
