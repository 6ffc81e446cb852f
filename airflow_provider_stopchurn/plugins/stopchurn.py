"""The StopChurn page of the Airflow UI, as an Airflow plugin.

Airflow finds :class:`StopChurnPlugin` through the ``airflow.plugins`` entry point of this package. Airflow loads
entry-point plugins always, and the ``plugins`` list of provider info only when ``[core] lazy_discover_providers``
is off (it is on by default); listing the plugin in both would register it twice, so provider info does not.

The plugin adds a FastAPI app that the API server mounts at ``/stopchurn`` (:mod:`.app`) and an external view,
"StopChurn" in the Browse menu, that shows its page inside the Airflow UI.

Every task loads plugins too (for macros), so this module imports neither FastAPI nor Airflow's models: the
FastAPI app is built on the first request the API server hands it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk.plugins_manager import AirflowPlugin
else:
    try:
        from airflow.sdk.plugins_manager import AirflowPlugin
    except ImportError:  # older Airflow 3
        from airflow.plugins_manager import AirflowPlugin

#: Where the API server mounts the page's app; the external view points there.
URL_PREFIX = "/stopchurn"

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _PageApp:
    """The ASGI app the API server mounts: it builds the FastAPI app of :mod:`.app` on its first request."""

    def __init__(self) -> None:
        self._app: Callable[[_Scope, _Receive, _Send], Awaitable[None]] | None = None

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if self._app is None:
            from airflow_provider_stopchurn.plugins.app import create_app

            self._app = create_app(URL_PREFIX)
        await self._app(scope, receive, send)


class StopChurnPlugin(AirflowPlugin):
    """The "StopChurn" page: a FastAPI app in the API server, shown in the nav as an external view."""

    name = "stopchurn"
    fastapi_apps = [  # noqa: RUF012 - Airflow's plugin interface is class attributes
        {"app": _PageApp(), "url_prefix": URL_PREFIX, "name": "StopChurn syncs"}
    ]
    external_views = [  # noqa: RUF012
        {
            "name": "StopChurn",
            # relative: the Airflow UI resolves it against its base URL and shows the page in a frame
            "href": URL_PREFIX.lstrip("/") + "/",
            "icon": URL_PREFIX.lstrip("/") + "/icon.svg",
            "url_route": "stopchurn",
            "destination": "nav",
            "category": "browse",
        }
    ]
