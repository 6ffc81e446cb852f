"""A real multi-worker Airflow deployment on 127.0.0.1, for ``tests/test_deploy.py`` (no pytest here).

:func:`running_deployment` starts, and always stops again:

* a throwaway PostgreSQL (``pg_server.running_postgres``) as Airflow's metadata database and Celery's result
  backend;
* Debian's ``redis-server`` as the Celery broker (a free port, no persistence);
* moto's S3 server (in this process) with one bucket for the snapshots;
* the package's StopChurn sandbox, behind :class:`RequestLog`, a forwarding proxy that records when each request
  to the StopChurn API started and ended and which source (a ``source`` column of the rows) it carried;
* Airflow with the CeleryExecutor: ``api-server`` (the execution API the workers' tasks talk to), ``scheduler``,
  ``dag-processor`` and two ``airflow celery worker`` processes, each with its own ``AIRFLOW_HOME`` (its own local
  disk), sharing the metadata database, the broker and the DAGs folder.

Where this process may (root, and Linux namespaces allowed: ``unshare``), worker 2 runs as a second machine: its
own host name (:data:`SECOND_HOST`) and its own disk mounted at the same ``AIRFLOW_HOME`` path as worker 1's, as
two machines built from one image would be. A lock left by a process of the other host cannot be judged by its
pid there, and the default local ``snapshot_uri`` names the same path on both. Elsewhere both workers share the
host name and their ``AIRFLOW_HOME`` paths differ (:attr:`Deployment.separate_hosts` says which).

Every Airflow process runs in a session of its own, so stopping it (SIGTERM, then SIGKILL after a bounded wait)
reaches the task processes it forked. Which worker runs a task is decided by Celery queues: each worker starts
on its own queue (``w1``, ``w2``) and :meth:`Deployment.route` moves a scenario's queue from one worker to the
other at runtime (Celery's ``add_consumer`` / ``cancel_consumer`` remote control).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pg_server import PostgresServer, running_postgres
from throwaway_server import free_port, stop_session, tail

from airflow_provider_stopchurn.sandbox import SandboxServer

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
AIRFLOW = [PYTHON, "-m", "airflow"]
TOKEN = "deploy-test-key"
BRAND = 7
BUCKET = "stopchurn-snapshots"
WORKERS = ("w1", "w2")
#: bounded waits (seconds); generous for a loaded 2-core machine, never reached when things work
START_TIMEOUT = 180.0
STOP_TIMEOUT = 20.0


class DeployUnavailable(RuntimeError):
    """Something the deployment needs is missing on this machine (redis-server, PostgreSQL binaries)."""


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Call ``probe`` until it returns something truthy (returned); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except Exception as err:
            last, result = err, None
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else "")
    )


# --- the request log: a forwarding proxy in front of the sandbox -------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One StopChurn API request as the proxy saw it: monotonic start and end, status, the rows' sources."""

    started: float
    ended: float
    status: int
    sources: frozenset[str]
    updates: int


class RequestLog:
    """A proxy that forwards every request to ``target`` and records it (:attr:`requests`).

    While :meth:`hold` is in force, requests wait (bounded) before being forwarded, so a test can line runs up.
    """

    def __init__(self, target: str) -> None:
        self.target = target.removeprefix("http://")
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def start(self) -> RequestLog:
        log = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

            def do_PUT(self) -> None:
                self._forward("PUT")

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                api = self.path.startswith("/client-data/")
                if api:
                    log._open.wait(timeout=120)
                started = time.monotonic()
                upstream = http.client.HTTPConnection(log.target, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    upstream.request(method, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    status, content_type = response.status, response.getheader("Content-Type")
                except OSError:  # the sandbox dropped the connection (a fault): drop ours too
                    self.close_connection = True
                    return
                finally:
                    upstream.close()
                ended = time.monotonic()
                if api:
                    sources, count = _sources(body)
                    with log._lock:
                        log.requests.append(Request(started, ended, status, sources, count))
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a killed task's connection breaks mid-request: expected here, not worth a traceback

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._open.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _sources(body: bytes) -> tuple[frozenset[str], int]:
    try:
        items = json.loads(body)["data"]
        return frozenset(str(item["data"]["data"].get("source")) for item in items), len(items)
    except (ValueError, KeyError, TypeError):
        return frozenset(), 0


# --- processes ---------------------------------------------------------------------------------------------------
@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the whole session (the service and what it forked), SIGKILL after a bounded wait."""
        stop_session(self.process, STOP_TIMEOUT)


def spawn(name: str, cmd: list[str], env: dict[str, str], logdir: Path) -> Service:
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return Service(name, process, log)


def redis_binary() -> str:
    """Debian's redis-server (on PATH, or where the package puts it); :class:`DeployUnavailable` without it."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if binary is None:
        raise DeployUnavailable("redis-server is not installed (Debian: apt-get install redis-server)")
    return binary


def start_redis(root: Path, logdir: Path) -> tuple[Service, str]:
    binary = redis_binary()
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(root), "--protected-mode", "no"]
    service = spawn("redis", cmd, dict(os.environ), logdir)

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    wait_for("redis-server", ping, 30, 0.1)
    return service, f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def running_s3() -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1 with the snapshot bucket; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        request = urllib.request.Request(f"{url}/{BUCKET}", method="PUT")
        wait_for("moto's S3 server", lambda: urllib.request.urlopen(request, timeout=5).status == 200, 30, 0.2)
        yield url
    finally:
        server.stop()


# --- the deployment ----------------------------------------------------------------------------------------------
@dataclass
class Deployment:
    root: Path
    dags: Path
    shared: Path
    metadata: PostgresServer
    broker_url: str
    api_url: str
    s3_url: str
    sandbox: SandboxServer
    request_log: RequestLog
    #: where this process sees each worker's local disk (its AIRFLOW_HOME)
    homes: dict[str, Path]
    #: worker 2 runs as a second machine: its own host name, its own disk mounted at worker 1's AIRFLOW_HOME path
    separate_hosts: bool
    services: dict[str, Service] = field(default_factory=dict)

    # --- the REST API (the simple auth manager, every user an admin) ------------------------------------------
    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.api_url}/api/v2/{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def wait_dag(self, dag_id: str) -> None:
        wait_for(f"DAG {dag_id} to be parsed", lambda: self.api("GET", f"dags/{dag_id}")["dag_id"] == dag_id, 120, 1)

    def trigger(self, dag_id: str, run_id: str) -> str:
        self.api("POST", f"dags/{dag_id}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
        return run_id

    # --- the metadata database ------------------------------------------------------------------------------
    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.metadata.connect() as conn:
            return list(conn.execute(sql, params).fetchall())

    def task(self, dag_id: str, run_id: str, task_id: str = "sync") -> dict[str, Any] | None:
        rows = self.query(
            "SELECT state, try_number, queue, start_date, end_date FROM task_instance "
            "WHERE dag_id = %s AND run_id = %s AND task_id = %s",
            dag_id,
            run_id,
            task_id,
        )
        if not rows:
            return None
        state, try_number, queue, start, end = rows[0]
        return {"state": state, "try_number": try_number, "queue": queue, "start_date": start, "end_date": end}

    def wait_task(self, dag_id: str, run_id: str, states: set[str], timeout: float = 180) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            self.check_alive()
            task = self.task(dag_id, run_id)
            return task if task and task["state"] in states else None

        return wait_for(f"{dag_id}/{run_id} to reach {sorted(states)}", probe, timeout, 0.5)

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 180) -> str:
        def probe() -> str | None:
            self.check_alive()
            rows = self.query("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", dag_id, run_id)
            return rows[0][0] if rows and rows[0][0] in ("success", "failed") else None

        return wait_for(f"run {dag_id}/{run_id} to end", probe, timeout, 0.5)

    def xcom(self, dag_id: str, run_id: str, task_id: str = "sync") -> Any:
        rows = self.query(
            "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND task_id = %s AND key = 'return_value'",
            dag_id,
            run_id,
            task_id,
        )
        if not rows:
            return None
        value = rows[0][0]
        return json.loads(value) if isinstance(value, str | bytes) else value

    def variables(self, prefix: str) -> dict[str, str]:
        return dict(self.query("SELECT key, val FROM variable WHERE key LIKE %s", prefix + "%"))

    # --- the workers -----------------------------------------------------------------------------------------
    def task_log(self, worker: str, dag_id: str, run_id: str, attempt: int, task_id: str = "sync") -> Path | None:
        """The log file of one try, if ``worker`` ran it (each worker writes logs under its own AIRFLOW_HOME)."""
        folder = self.homes[worker] / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        found = sorted(folder.glob(f"attempt={attempt}.log")) if folder.is_dir() else []
        return found[0] if found else None

    def route(self, queue: str, to: str) -> None:
        """Make ``queue`` consumed by worker ``to`` only (Celery remote control), confirmed by both workers."""
        from celery import Celery

        app = Celery(broker=self.broker_url)
        try:
            for worker in WORKERS:
                destination = [f"{worker}@deploy"]
                if worker == to:
                    app.control.add_consumer(queue, destination=destination, reply=True, timeout=10)
                else:
                    app.control.cancel_consumer(queue, destination=destination, reply=True, timeout=10)

            def consumed() -> bool:
                active = app.control.inspect(destination=[f"{w}@deploy" for w in WORKERS], timeout=5).active_queues()
                if not active or len(active) != len(WORKERS):
                    return False
                queues = {name.split("@")[0]: {q["name"] for q in qs} for name, qs in active.items()}
                return all((queue in queues[w]) == (w == to) for w in WORKERS)

            wait_for(f"queue {queue} routed to {to}", consumed, 30, 0.5)
        finally:
            app.close()

    def check_alive(self) -> None:
        dead = [s for s in self.services.values() if not s.alive()]
        if dead:
            raise RuntimeError(
                "Airflow process(es) died: "
                + ", ".join(s.name for s in dead)
                + "".join(f"\n--- {s.name} ---\n{tail(s.log)}" for s in dead)
            )

    def diagnostics(self) -> str:
        return "".join(f"\n--- {s.name} ---\n{tail(s.log)}" for s in self.services.values())


def airflow_env(
    home: Path,
    dags: Path,
    shared: Path,
    metadata: PostgresServer,
    broker_url: str,
    api_port: int,
    s3_url: str,
    stopchurn_url: str,
) -> dict[str, str]:
    """The environment of one Airflow process; only ``AIRFLOW_HOME`` differs between them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTEST", "AWS_"))}
    sql = f"postgresql+psycopg2://{metadata.user}@{metadata.host}:{metadata.port}/{metadata.dbname}"
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql,
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{metadata.user}@{metadata.host}:{metadata.port}/{metadata.dbname}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "AIRFLOW__CELERY__DEFAULT_QUEUE": "default",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": "deploy-test-jwt-secret-shared-by-every-process",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__OPENLINEAGE__DISABLED": "True",
            "AIRFLOW_CONN_STOPCHURN_DEFAULT": json.dumps(
                {"conn_type": "stopchurn", "host": stopchurn_url, "password": TOKEN, "extra": {"brand_id": BRAND}}
            ),
            # short request timeouts (a request's 10 s), so that a short lock_ttl_s can fence every request
            "AIRFLOW_CONN_STOPCHURN_SHORT": json.dumps(
                {
                    "conn_type": "stopchurn",
                    "host": stopchurn_url,
                    "password": TOKEN,
                    "extra": {"brand_id": BRAND, "timeout": 5},
                }
            ),
            # the S3 snapshot store (moto) and where the DAGs and the test exchange markers
            "AWS_ENDPOINT_URL": s3_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",  # moto's
            "AWS_DEFAULT_REGION": "us-east-1",
            "STOPCHURN_DEPLOY_SHARED": str(shared),
            "STOPCHURN_DEPLOY_BUCKET": BUCKET,
        }
    )
    return env


def _migrate(env: dict[str, str], logdir: Path) -> None:
    log = logdir / "db-migrate.log"
    with log.open("wb") as out:
        result = subprocess.run(
            [*AIRFLOW, "db", "migrate"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=START_TIMEOUT,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed ({result.returncode}):\n{tail(log)}")


SECOND_HOST = "stopchurn-worker-2"
_SECOND_MACHINE = 'hostname "$1" && mount --bind "$2" "$3" && shift 3 && exec "$@"'


def can_run_as_second_machine() -> bool:
    """Whether this process may give a worker its own host name and mounts (root, and namespaces allowed)."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return False
    probe = [unshare, "--uts", "--mount", "--propagation", "private", "sh", "-c", "hostname probe"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def as_second_machine(hostname: str, disk: Path, mount_at: Path, cmd: list[str]) -> list[str]:
    """``cmd`` in its own UTS and mount namespaces: host name ``hostname``, ``disk`` mounted at ``mount_at``.

    The namespaces end with the last process in them: nothing is left mounted on the host.
    """
    unshare = ["unshare", "--uts", "--mount", "--propagation", "private"]
    return [*unshare, "sh", "-c", _SECOND_MACHINE, "sh", hostname, str(disk), str(mount_at), *cmd]


@contextlib.contextmanager
def running_deployment(write_dags: Callable[[Path], None]) -> Iterator[Deployment]:
    """The whole deployment, with the DAG files ``write_dags(folder)`` writes; everything is stopped on exit."""
    redis_binary()  # before anything is started
    root = Path(tempfile.mkdtemp(prefix="stopchurn-deploy-"))
    logdir, dags, shared = root / "logs", root / "dags", root / "shared"
    for folder in (logdir, dags, shared):
        folder.mkdir()
    write_dags(dags)
    separate_hosts = can_run_as_second_machine()
    homes = {name: root / f"home-{name}" for name in ("control", *WORKERS)}
    for home in homes.values():
        home.mkdir()
    # as a second machine, worker 2 sees its own disk at the same AIRFLOW_HOME path as worker 1's
    worker_home = {"w1": homes["w1"], "w2": homes["w1"] if separate_hosts else homes["w2"]}
    services: list[Service] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        metadata = stack.enter_context(running_postgres())
        metadata.execute('CREATE DATABASE "airflow"')
        metadata = metadata.with_database("airflow")
        redis, broker_url = start_redis(root, logdir)
        services.append(redis)
        stack.callback(lambda: [s.stop() for s in reversed(services)])
        s3_url = stack.enter_context(running_s3())
        sandbox = stack.enter_context(SandboxServer(token=TOKEN, record=True))
        request_log = RequestLog(sandbox.url).start()
        stack.callback(request_log.stop)
        api_port = free_port()

        def env_for(home: Path) -> dict[str, str]:
            return airflow_env(home, dags, shared, metadata, broker_url, api_port, s3_url, request_log.url)

        # the workers need no database schema to start: start them while the schema is created
        deployment = Deployment(
            root,
            dags,
            shared,
            metadata,
            broker_url,
            f"http://127.0.0.1:{api_port}",
            s3_url,
            sandbox,
            request_log,
            {name: homes[name] for name in WORKERS},
            separate_hosts,
        )
        for worker in WORKERS:
            cmd = [*AIRFLOW, "celery", "worker", "-q", worker, "-c", "2", "-H", f"{worker}@deploy", "--skip-serve-logs"]
            if worker == "w2" and separate_hosts:
                cmd = as_second_machine(SECOND_HOST, homes["w2"], worker_home["w2"], cmd)
            deployment.services[worker] = spawn(worker, cmd, env_for(worker_home[worker]), logdir)
        services.extend(deployment.services.values())
        _migrate(env_for(homes["control"]), logdir)
        for name, cmd in (
            ("api-server", [*AIRFLOW, "api-server", "-H", "127.0.0.1", "-p", str(api_port), "-w", "1"]),
            ("scheduler", [*AIRFLOW, "scheduler"]),
            ("dag-processor", [*AIRFLOW, "dag-processor"]),
        ):
            deployment.services[name] = service = spawn(name, cmd, env_for(homes["control"]), logdir)
            services.append(service)
        # services may be replaced (a killed worker): stop whatever is current at exit too
        stack.callback(lambda: [s.stop() for s in list(deployment.services.values())])
        try:
            wait_for(
                "the API server", lambda: deployment.check_alive() or deployment.api("GET", "version"), START_TIMEOUT, 1
            )
            from celery import Celery

            app = Celery(broker=broker_url)
            try:
                wait_for(
                    "both Celery workers",
                    lambda: (
                        deployment.check_alive()
                        or len(app.control.ping(destination=[f"{w}@deploy" for w in WORKERS], timeout=2))
                        == len(WORKERS)
                    ),
                    START_TIMEOUT,
                    1,
                )
            finally:
                app.close()
        except (TimeoutError, RuntimeError) as err:
            raise RuntimeError(f"{err}{deployment.diagnostics()}") from err
        yield deployment
