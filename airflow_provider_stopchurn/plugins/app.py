"""The FastAPI app of the StopChurn page, mounted by the API server (see :mod:`.stopchurn`).

Routes, under the mount point (``/stopchurn``):

* ``GET /``: the page (``?task=<dag_id>/<task_id>`` picks the task of the chart; ``?refresh=<seconds>`` how often
  it refreshes itself while shown, 0: never);
* ``GET /api/syncs``: the same data as JSON;
* ``GET /icon.svg``: the nav icon.

The page and the JSON need a logged-in user (Airflow's JWT, from the UI's cookie or an ``Authorization: Bearer``
header); a browser without one is sent to Airflow's login page. The DAGs are those the auth manager lets the user
read (``get_authorized_dag_ids(user=..., method="GET")``), so a user who cannot read a DAG sees none of its syncs.

The data is what Airflow holds: the StopChurn tasks of those DAGs (serialized DAGs; a task counts when its class
name starts with ``StopChurn``), their task instances (newest 30 per task), the summaries they returned (XCom
``return_value``) and the store each used (rendered ``brand_id``, ``table_name``/``stream_id`` and
``snapshot_uri``/``state_uri``, per run: a templated task may use several); and, through the snapshot store's
public API, each of those stores' lock, pending plan, quarantined rows and run history (records of failed runs
included) where the API server can reach it (:mod:`.stores`); :mod:`.page` renders them.

This module does not use ``from __future__ import annotations``: FastAPI reads the routes' annotations at runtime.
"""

import logging
from dataclasses import asdict
from typing import Annotated, Any

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.core_api.security import get_user
from airflow.models.dag import DagModel
from airflow.models.dagrun import DagRun
from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
from airflow.models.serialized_dag import SerializedDagModel
from airflow.models.taskinstance import TaskInstance as TI
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from airflow_provider_stopchurn.events.ledger import EVENTS_FOLDER, event_store
from airflow_provider_stopchurn.operators._common import snapshot_root
from airflow_provider_stopchurn.plugins.model import CHART_RUNS, Run, StoreState, SyncTask, record_belongs
from airflow_provider_stopchurn.plugins.page import MIN_REFRESH_S, REFRESH_S, render_page
from airflow_provider_stopchurn.plugins.stores import inspect_stores
from airflow_provider_stopchurn.store import SnapshotStore

log = logging.getLogger(__name__)

#: A task is a StopChurn task when its operator class name starts with this.
OPERATOR_PREFIX = "StopChurn"

ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#3c6df0" stroke-width="2" '
    'stroke-linecap="round" stroke-linejoin="round"><path d="M4 12a8 8 0 0 1 13.7-5.7L20 8"/>'
    '<path d="M20 3v5h-5"/><path d="M20 12a8 8 0 0 1-13.7 5.7L4 16"/><path d="M4 21v-5h5"/></svg>'
)

UserDep = Annotated[BaseUser, Depends(get_user)]


# --- reading Airflow's metadata database ---------------------------------------------------------------------
def _unwrap(value: Any) -> Any:
    """A serialized-DAG value without its ``{"__var": ..., "__type": ...}`` envelope."""
    while isinstance(value, dict) and "__var" in value and "__type" in value:
        value = value["__var"]
    return value


def _serialized_tasks(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The StopChurn tasks of one serialized DAG: task id, class name and the (unrendered) template fields."""
    found = []
    for item in (data or {}).get("dag", {}).get("tasks", []):
        task = _unwrap(item)
        if not isinstance(task, dict):
            continue
        task_type = task.get("task_type") or task.get("_task_type")
        if not (isinstance(task_type, str) and task_type.startswith(OPERATOR_PREFIX)):
            continue
        fields = dict(task)
        partial = _unwrap(task.get("partial_kwargs"))
        if isinstance(partial, dict):  # a mapped task keeps its arguments apart
            fields.update({key: _unwrap(value) for key, value in partial.items()})
        found.append({"task_id": str(task["task_id"]), "operator": task_type, "fields": fields})
    return found


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _plain(value: Any) -> str | None:
    """A template field's value when it is a plain string (no Jinja left), else None."""
    return value if isinstance(value, str) and value and "{{" not in value and "{%" not in value else None


def _declared_tasks(session: Session, dag_ids: set[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """``(dag_id, task_id) -> task`` for the StopChurn tasks of the latest serialized version of each active DAG."""
    active = sorted(session.scalars(select(DagModel.dag_id).where(DagModel.dag_id.in_(dag_ids), ~DagModel.is_stale)))
    declared = {}
    for serialized in SerializedDagModel.get_latest_serialized_dags(dag_ids=active, session=session):
        for task in _serialized_tasks(serialized.data):
            declared[(serialized.dag_id, task["task_id"])] = task
    return declared


def _same_instance(model: Any, recent: Any, columns: tuple[str, ...], *more: Any) -> Any:
    """The join condition of ``model``'s rows of a task instance of ``recent``: equal on ``columns``, and ``more``."""
    return and_(*(getattr(model, column) == getattr(recent.c, column) for column in columns), *more)


def _recent_runs(session: Session, declared: dict[tuple[str, str], dict[str, Any]], history: int) -> list[Any]:
    """The newest ``history`` task instances of each declared task (per map index), oldest first, with the
    summary each returned (XCom ``return_value``, if any) and its rendered template fields (if kept)."""
    newest_first = func.row_number().over(
        partition_by=(TI.dag_id, TI.task_id, TI.map_index), order_by=(DagRun.run_after.desc(), DagRun.id.desc())
    )
    recent = (
        select(
            TI.dag_id,
            TI.task_id,
            TI.map_index,
            TI.run_id,
            TI.state,
            TI.try_number,
            DagRun.id.label("dag_run_id"),
            DagRun.run_after,
            newest_first.label("age"),
        )
        .join(DagRun, and_(DagRun.dag_id == TI.dag_id, DagRun.run_id == TI.run_id))
        .where(
            TI.dag_id.in_(sorted({dag_id for dag_id, _ in declared})),
            TI.task_id.in_(sorted({task_id for _, task_id in declared})),
        )
        .subquery()
    )
    query = (
        select(recent, XComModel.value.label("value"), RTIF.rendered_fields)
        .outerjoin(
            XComModel,
            _same_instance(XComModel, recent, ("dag_run_id", "task_id", "map_index"), XComModel.key == "return_value"),
        )
        .outerjoin(RTIF, _same_instance(RTIF, recent, ("dag_id", "task_id", "run_id", "map_index")))
        .where(recent.c.age <= history)
        .order_by(recent.c.run_after, recent.c.dag_run_id)
    )
    return [row for row in session.execute(query) if (row.dag_id, row.task_id) in declared]


def _first(values: Any, convert: Any) -> Any:
    return next((found for found in map(convert, values) if found is not None), None)


def _describe_run(task: SyncTask, run: Run, declared: dict[str, Any], rendered: dict[str, Any] | None) -> None:
    """Brand, table (an events task's stream) and store location of one run: as its summary says, else its
    rendered fields, else its DAG (when not templated)."""
    summary = run.summary or {}
    values = rendered or {}
    run.brand_id = _first((summary.get("brand_id"), values.get("brand_id"), declared.get("brand_id")), _as_int)
    if task.kind == "events":
        default_stream = f"{task.dag_id}.{task.task_id}"
        run.table_name = _first(
            (summary.get("stream"), values.get("stream_id"), declared.get("stream_id"), default_stream), _plain
        )
        uri_field = "state_uri"
    else:
        run.table_name = _first(
            (summary.get("table_name"), values.get("table_name"), declared.get("table_name")), _plain
        )
        uri_field = "snapshot_uri"
    if rendered is not None:  # what this run used (None: the default location)
        run.store_uri, run.store_uri_known = _plain(values.get(uri_field)), True
    else:
        uri = declared.get(uri_field)
        run.store_uri, run.store_uri_known = _plain(uri), _plain(uri) == uri


def _describe(task: SyncTask, declared: dict[str, Any]) -> None:
    """Table, brand and store location of ``task``: its newest run's that names them, else its DAG's."""
    conn_id = declared.get("state_conn_id" if task.kind == "events" else "snapshot_conn_id")
    task.store_conn_id = conn_id if isinstance(conn_id, str) and conn_id else None
    newest = next((run for run in reversed(task.runs) if run.table_name and run.brand_id is not None), None)
    if newest is not None:
        task.table_name, task.brand_id = newest.table_name, newest.brand_id
        task.snapshot_uri, task.snapshot_uri_known = newest.store_uri, newest.store_uri_known
        return
    probe = Run(run_id="", run_after=None, state=None)
    _describe_run(task, probe, declared, None)
    task.table_name, task.brand_id = probe.table_name, probe.brand_id
    task.snapshot_uri, task.snapshot_uri_known = probe.store_uri, probe.store_uri_known


def load_sync_tasks(session: Session, dag_ids: set[str], *, history: int = CHART_RUNS) -> list[SyncTask]:
    """The StopChurn tasks of the active DAGs among ``dag_ids``, each with its newest ``history`` runs (oldest
    first), sorted by DAG and task id. A task that never ran is listed without runs."""
    declared = _declared_tasks(session, dag_ids) if dag_ids else {}
    if not declared:
        return []
    tasks: dict[tuple[str, str, int], SyncTask] = {}
    for row in _recent_runs(session, declared, history):
        key = (row.dag_id, row.task_id, row.map_index)
        if key not in tasks:
            tasks[key] = SyncTask(row.dag_id, row.task_id, declared[key[:2]]["operator"], map_index=row.map_index)
        summary = XComModel.deserialize_value(row) if row.value is not None else None
        run = Run(
            run_id=row.run_id,
            run_after=row.run_after,
            state=None if row.state is None else str(row.state),
            try_number=row.try_number or 0,
            summary=summary if isinstance(summary, dict) else None,
        )
        rendered = row.rendered_fields if isinstance(row.rendered_fields, dict) else None
        _describe_run(tasks[key], run, declared[key[:2]]["fields"], rendered)
        tasks[key].runs.append(run)
    ran = {key[:2] for key in tasks}
    for (dag_id, task_id), spec in declared.items():
        if (dag_id, task_id) not in ran:
            tasks[(dag_id, task_id, -1)] = SyncTask(dag_id, task_id, spec["operator"])
    for key, task in tasks.items():
        _describe(task, declared[key[:2]]["fields"])
    return sorted(tasks.values(), key=lambda t: (t.dag_id, t.task_id, t.map_index))


def _store_of(task: SyncTask, brand_id: int, name: str, uri: str | None, conn_id: str | None) -> tuple[Any, Any]:
    """``(root, SnapshotStore)`` of a run's store: a table's snapshot store, or an event stream's ledger."""
    root = snapshot_root(uri, conn_id)
    if task.kind == "events":
        store = event_store(root, brand_id, name)
        return root / EVENTS_FOLDER, store
    return root, SnapshotStore(root, brand_id, name)


def attach_stores(tasks: list[SyncTask]) -> None:
    """Find every store the tasks' runs used, read each once (bounded in time), and give each task its stores
    (``stores``, the newest run's first; ``store``, the newest run's) and each run its history records."""
    targets: dict[tuple[str, int, str], Any] = {}
    kinds: dict[tuple[str, int, str], str] = {}
    failed: dict[tuple[str, int, str], StoreState] = {}
    for task in tasks:
        for run in task.runs:
            if not (run.store_uri_known and run.brand_id is not None and run.table_name):
                continue
            try:
                root, store = _store_of(task, run.brand_id, run.table_name, run.store_uri, task.store_conn_id)
                key = (store.location, run.brand_id, run.table_name)
            except Exception as err:  # a location this process cannot even name
                key = (str(run.store_uri), run.brand_id, run.table_name)
                failed[key] = StoreState(
                    location=key[0], brand_id=key[1], table_name=key[2], error=f"{type(err).__name__}: {err}"
                )
            else:
                targets.setdefault(key, root)
            kinds[key] = "events" if task.kind == "events" else "snapshot"
            run.store_key = key
    states = {**inspect_stores(targets), **failed}
    for key, state in states.items():
        state.kind = kinds.get(key, state.kind)
    for task in tasks:
        task.stores, task.store = [], None
        for run in reversed(task.runs):
            found = states.get(run.store_key) if run.store_key is not None else None
            if found is None:
                continue
            if task.store is None:
                task.store = found
            if all(known.key != found.key for known in task.stores):
                task.stores.append(found)
        for run in task.runs:
            candidates = [states[run.store_key]] if run.store_key in states else task.stores
            run.records = [
                record
                for candidate in candidates
                for record in candidate.history
                if record_belongs(record, task.dag_id, task.task_id, run.run_id, task.map_index)
            ]


def _username(user: Any) -> str:
    try:
        return str(user.get_name())
    except Exception:
        return "you"


def collect(user: Any) -> list[SyncTask]:
    """Everything the page shows to ``user``."""
    with create_session() as session:
        readable = get_auth_manager().get_authorized_dag_ids(user=user, method="GET", session=session)
        tasks = load_sync_tasks(session, set(readable))
    attach_stores(tasks)
    return tasks


# --- the app -------------------------------------------------------------------------------------------------
def create_app(url_prefix: str) -> FastAPI:
    """The page's app; ``url_prefix`` is where the API server mounts it."""
    app = FastAPI(title="StopChurn", docs_url=None, redoc_url=None, openapi_url=None)

    def airflow_base(request: Request) -> str:
        """The URL path of Airflow's UI, from where the API server mounted this app."""
        return str(request.scope.get("root_path") or "").removesuffix(url_prefix) + "/"

    @app.exception_handler(HTTPException)
    async def log_in_first(request: Request, exc: HTTPException) -> Response:
        """A browser that is not logged in goes to Airflow's login page, and comes back after."""
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        return await http_exception_handler(request, exc)

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request, user: UserDep, task: str | None = None, refresh: int | None = None) -> Response:
        tasks = await run_in_threadpool(collect, user)
        every = REFRESH_S if refresh is None else (0 if refresh <= 0 else max(MIN_REFRESH_S, refresh))
        html = render_page(
            tasks, selected=task, airflow_base=airflow_base(request), user=_username(user), refresh_s=every
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/api/syncs")
    async def syncs(user: UserDep) -> JSONResponse:
        tasks = await run_in_threadpool(collect, user)
        payload = [{"key": task.key, **asdict(task)} for task in tasks]
        return JSONResponse({"tasks": jsonable(payload)}, headers={"Cache-Control": "no-store"})

    @app.get("/icon.svg")
    async def icon() -> Response:
        return Response(ICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    return app


def jsonable(value: Any) -> Any:
    """``value`` with datetimes as ISO strings (the rest of a summary is JSON already)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
