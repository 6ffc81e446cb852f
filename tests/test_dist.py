"""The provider as a user installs it: ``make dist`` builds the sdist and the wheel and checks both with
``twine check --strict``; the wheel goes into a clean virtualenv with Airflow pinned to this environment's version,
and Airflow discovers everything the provider declares there.

One build and one install for the whole module (15 to 40 s with uv's cache warm): ``make dist`` runs on a copy of
the checkout (the build writes an egg-info next to ``pyproject.toml``, which in the checkout would make Airflow
load the plugin twice), and the virtualenv is resolved with the dev lock as constraints so that it holds the
tested versions and comes from uv's cache when it can (``UV_OFFLINE``), from the index when it cannot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_stopchurn import __version__
from airflow_provider_stopchurn.cli import COMMANDS
from airflow_provider_stopchurn.get_provider_info import get_provider_info

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.dist,
    # an unpacked sdist holds the tests but not the Makefile (the demo and benchmarks it also drives stay out)
    pytest.mark.skipif(not (ROOT / "Makefile").is_file(), reason="runs `make dist`: needs the repository's Makefile"),
]
PACKAGE = "airflow-provider-stopchurn"
MODULE = "airflow_provider_stopchurn"
WHEEL_NAME = f"{MODULE}-{__version__}-py3-none-any.whl"
SDIST_NAME = f"{MODULE}-{__version__}.tar.gz"
#: Folders of the checkout that are not part of the installed provider.
NOT_SHIPPED = ("tests/", "demo/", "benchmarks/", "example_dags/", "docs/", ".ci/")
#: What the copy of the checkout leaves out: version control, virtualenvs, earlier builds, large local data.
NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".venv-*",
    "dist",
    "build",
    "*.egg-info",
    ".data",
    ".demo",
    ".airflow",
    ".artifacts",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
)
#: Planted in the copy before the build: local clutter that neither archive may pick up.
PLANTED = (
    f"{MODULE}/__pycache__/planted.cpython-311.pyc",
    "tests/__pycache__/planted.cpython-311.pyc",
    "tests/.pytest_cache/planted",
    ".pytest_cache/planted",
    ".hypothesis/planted",
    ".venv/pyvenv.cfg",
)


@dataclass(frozen=True)
class Built:
    wheel: Path
    sdist: Path
    make_output: str
    source: Path


@dataclass(frozen=True)
class Installed:
    venv: Path
    env: dict[str, str]
    cwd: Path

    def run(self, *args: str) -> str:
        """Run a program of the virtualenv (``bin/<args[0]>``) and return its standard output."""
        proc = subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=300,
            env=self.env,
            cwd=self.cwd,
        )
        assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout


def _without(env: Mapping[str, str], *prefixes: str) -> dict[str, str]:
    return {key: value for key, value in env.items() if not key.startswith(prefixes)}


def _run_offline_first(cmd: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run a command that installs with uv: from uv's cache alone first (no network, the same versions every
    time), from the index only when the cache lacks something (a fresh machine)."""
    tries = []
    for extra in ({"UV_OFFLINE": "1"}, {}):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, **extra}, cwd=cwd)
        if proc.returncode == 0:
            return proc.stdout + proc.stderr
        tries.append(f"$ {' '.join(cmd)} {extra}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    pytest.fail("\n".join(tries))


def _uv() -> str:
    # the dev venv's uv (requirements-dev.lock pins it) sits beside this interpreter; not resolved, since the
    # interpreter of a venv is a symlink to the base Python
    candidate = Path(sys.executable).parent / "uv"
    found = str(candidate) if candidate.is_file() else shutil.which("uv")
    if found is None:
        pytest.fail("uv is in requirements-dev.lock but neither beside the interpreter nor on PATH")
    return found


def _constraints(airflow: str) -> Path:
    """The lock that pins this environment's Airflow (the dev lock for the newest minor)."""
    for lock in (ROOT / "requirements-dev.lock", *sorted(ROOT.glob("requirements-airflow-*.lock"))):
        if f"\napache-airflow=={airflow}\n" in lock.read_text():
            return lock
    pytest.fail(f"no lock file of this checkout pins apache-airflow=={airflow}")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``make dist`` on a copy of the checkout, with this interpreter as the Makefile's Python."""
    source = tmp_path_factory.mktemp("checkout") / "src"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    for planted in PLANTED:
        (source / planted).parent.mkdir(parents=True, exist_ok=True)
        (source / planted).write_text("local clutter\n")
    env = _without(os.environ, "PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    # `-o <stamp>`: the dev virtualenv is this interpreter's, so the copy must not build its own
    output = _run_offline_first(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "dist", f"PY={sys.executable}"], env, source
    )
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)  # twine colours its verdicts
    return Built(source / "dist" / WHEEL_NAME, source / "dist" / SDIST_NAME, output, source)


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel in a clean virtualenv with this environment's Airflow, its own AIRFLOW_HOME, no metadata DB."""
    base = tmp_path_factory.mktemp("clean-install")
    venv = base / "venv"
    uv = _uv()
    uv_env = _without(os.environ, "PYTHONPATH", "VIRTUAL_ENV")
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=uv_env)
    airflow = version("apache-airflow")
    _run_offline_first(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(venv / "bin" / "python"),
            "-c",
            str(_constraints(airflow)),
            f"apache-airflow=={airflow}",
            str(built.wheel),
        ],
        uv_env,
        base,
    )
    home = base / "airflow-home"
    home.mkdir()
    # Nothing of this test run leaks in: not its AIRFLOW_* settings (conftest's home, DAGs folder, database), not
    # PYTHONPATH (the checkout's package would shadow the installed one). PYTHONDONTWRITEBYTECODE goes too: the
    # first command compiles what it imports, and the later ones start faster.
    env = _without(os.environ, "AIRFLOW", "PYTHON", "VIRTUAL_ENV")
    env |= {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "VIRTUAL_ENV": str(venv),
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return Installed(venv, env, base)


# --- the archives ---------------------------------------------------------------------------------------------


def test_make_dist_builds_and_checks_both_archives(built: Built) -> None:
    assert built.wheel.is_file() and built.sdist.is_file(), sorted(p.name for p in built.wheel.parent.iterdir())
    # twine check --strict on each: a README PyPI cannot render, or missing metadata, fails the target
    for name in (WHEEL_NAME, SDIST_NAME):
        assert f"Checking dist/{name}: PASSED" in built.make_output, built.make_output[-3000:]
    # an egg-info left beside pyproject.toml would put the package on sys.path twice when Python runs there,
    # and Airflow would register the plugin twice ("Plugin 'stopchurn' already registered")
    assert not list(built.source.glob("*.egg-info"))


def _wheel_names(built: Built) -> list[str]:
    with zipfile.ZipFile(built.wheel) as wheel:
        return wheel.namelist()


def test_wheel_holds_the_package_and_nothing_else(built: Built) -> None:
    names = _wheel_names(built)
    dist_info = f"{MODULE}-{__version__}.dist-info/"
    assert {name.split("/")[0] + "/" for name in names} == {f"{MODULE}/", dist_info}
    assert not [name for name in names if name.startswith(NOT_SHIPPED)]
    assert f"{MODULE}/py.typed" in names
    # every file of the package: its modules, the sandbox, any static asset of the plugin
    package = ROOT / MODULE
    expected = {
        f"{MODULE}/{path.relative_to(package).as_posix()}"
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert expected - set(names) == set()
    assert f"{MODULE}/sandbox/server.py" in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert f"{dist_info}licenses/LICENSE" in names


def test_readme_installs_this_versions_wheel() -> None:
    """The README's install commands and Dockerfile name the wheel `make dist` builds for this version."""
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install\n") : readme.index("## Supported Airflow versions\n")]
    deployment = readme[readme.index("## A real deployment\n") :]
    assert f"WHEEL=dist/{WHEEL_NAME}" in install
    assert f"COPY --chown=airflow:root dist/{WHEEL_NAME} /tmp/" in deployment
    assert f'"/tmp/{WHEEL_NAME}[postgres]"' in deployment


def test_wheel_metadata(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        metadata = wheel.read(f"{MODULE}-{__version__}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"{MODULE}-{__version__}.dist-info/entry_points.txt").decode()
    headers, _, description = metadata.partition("\n\n")
    fields = [tuple(line.split(": ", 1)) for line in headers.splitlines() if ": " in line]
    assert ("Name", PACKAGE) in fields and ("Version", __version__) in fields
    assert ("License-Expression", "Apache-2.0") in fields
    assert ("License-File", "LICENSE") in fields
    assert ("Description-Content-Type", "text/markdown") in fields
    assert ("Classifier", "Framework :: Apache Airflow :: Provider") in fields
    assert [value for key, value in fields if key == "Project-URL"], "no project URLs"
    assert description.startswith("# airflow-provider-stopchurn")  # the README is the long description
    assert "[apache_airflow_provider]" in entry_points and "[airflow.plugins]" in entry_points
    assert f"stopchurn = {MODULE}.cli:main" in entry_points
    for machine_path in ("/work/", "/root/", "/home/", "/tmp/"):
        assert machine_path not in headers, machine_path


def test_sdist_holds_the_sources_and_tests_but_no_local_clutter(built: Built) -> None:
    with tarfile.open(built.sdist) as sdist:
        names = [name.partition("/")[2] for name in sdist.getnames()]
    for needed in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", f"{MODULE}/py.typed"):
        assert needed in names, needed
    # the tests run from the sdist: all of them with their helpers, and what they read
    tests = {
        path.relative_to(ROOT).as_posix()
        for folder in ("tests", "example_dags")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and not {"__pycache__", ".pytest_cache", ".hypothesis"} & set(path.parts)
    }
    assert tests - set(names) == set()
    assert "tests/conftest.py" in names and "docs/invariants.md" in names
    assert not [name for name in names if name.startswith(("demo/", "benchmarks/", ".ci/", ".venv", "dist/"))]
    clutter = [name for name in names if "__pycache__" in name or name.endswith(".pyc") or "/." in f"/{name}"]
    assert clutter == []
    assert not [name for name in names if name in PLANTED]


# --- the clean install ------------------------------------------------------------------------------------------

# Run by the clean virtualenv's Python: what Airflow discovers, as JSON on the last line of its output.
_DISCOVER = """
import importlib, json, pkgutil, warnings
warnings.simplefilter("ignore")
from pathlib import Path
import airflow_provider_stopchurn as package
from airflow.providers_manager import ProvidersManager

try:  # Airflow 3.2+: tasks and hooks read the task runtime's manager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime
    hooks = ProvidersManagerTaskRuntime().hooks
except ImportError:
    hooks = ProvidersManager().hooks
pm = ProvidersManager()
provider = pm.providers.get("airflow-provider-stopchurn")
hook = hooks.get("stopchurn")
widgets = {
    key: {"field_name": w.field_name, "label": w.field["schema"].get("title"), "hook": w.hook_class_name}
    for key, w in pm.connection_form_widgets.items() if key.startswith("extra__stopchurn__")
}
# every module imports with only the declared dependencies (the pytest plugin of the sandbox needs pytest)
unimportable = {}
for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    if module.name.endswith(".pytest_plugin"):
        continue
    try:
        importlib.import_module(module.name)
    except Exception as error:
        unimportable[module.name] = repr(error)
from airflow_provider_stopchurn.plugins.app import create_app
from starlette.testclient import TestClient
icon = TestClient(create_app("/stopchurn")).get("/icon.svg")
print(json.dumps({
    "package_file": package.__file__,
    "py_typed": (Path(package.__file__).parent / "py.typed").is_file(),
    "provider": None if provider is None else {"version": provider.version, "data": provider.data},
    "hook": None if hook is None else {
        "class": hook.hook_class_name, "name": hook.hook_name, "conn_id_attribute": hook.connection_id_attribute_name,
        "testable": hook.connection_testable, "package": hook.package_name,
    },
    "behaviour": pm.field_behaviours.get("stopchurn"),
    "widgets": widgets,
    "unimportable": unimportable,
    "icon": [icon.status_code, icon.headers.get("content-type")],
}))
"""


@pytest.fixture(scope="module")
def discovered(installed: Installed) -> dict[str, Any]:
    out = installed.run("python", "-c", _DISCOVER)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


CONNECTION_TYPE = get_provider_info()["connection-types"][0]


def test_the_installed_package_is_the_wheels(installed: Installed, discovered: dict[str, Any]) -> None:
    site_packages = installed.venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    assert Path(discovered["package_file"]).is_relative_to(site_packages), discovered["package_file"]
    assert discovered["py_typed"]
    assert discovered["unimportable"] == {}


def test_providers_manager_lists_the_provider_with_its_info(discovered: dict[str, Any]) -> None:
    provider = discovered["provider"]
    assert provider is not None, "ProvidersManager does not list airflow-provider-stopchurn"
    assert provider["version"] == __version__
    assert provider["data"]["package-name"] == PACKAGE
    assert provider["data"]["name"] == "StopChurn"
    assert provider["data"]["connection-types"] == get_provider_info()["connection-types"]
    assert provider["data"]["cli"] == get_provider_info()["cli"]


def test_hook_of_the_connection_type(discovered: dict[str, Any]) -> None:
    assert discovered["hook"] == {
        "class": CONNECTION_TYPE["hook-class-name"],
        "name": "StopChurn",
        "conn_id_attribute": "stopchurn_conn_id",
        "testable": True,
        "package": PACKAGE,
    }


def test_connection_form_fields_and_behaviour(discovered: dict[str, Any]) -> None:
    behaviour = CONNECTION_TYPE["ui-field-behaviour"]
    assert discovered["behaviour"] == {
        "hidden_fields": behaviour["hidden-fields"],
        "relabeling": behaviour["relabeling"],
        "placeholders": behaviour["placeholders"],
    }
    fields = CONNECTION_TYPE["conn-fields"]
    assert discovered["widgets"] == {
        f"extra__stopchurn__{name}": {
            "field_name": name,
            "label": field["label"],
            "hook": CONNECTION_TYPE["hook-class-name"],
        }
        for name, field in fields.items()
    }


def test_plugin_is_listed_with_its_app_and_view(installed: Installed, discovered: dict[str, Any]) -> None:
    out = installed.run("airflow", "plugins", "-o", "json")
    assert "[" in out, f"no plugin loaded: {out[-2000:]}"
    plugins = json.loads(out[out.index("[") :])
    [plugin] = [p for p in plugins if p["name"] == "stopchurn"]  # once: not registered twice
    assert plugin["source"].startswith(f"{PACKAGE}=={__version__}: EntryPoint(")
    assert [(app["url_prefix"], app["name"]) for app in plugin["fastapi_apps"]] == [("/stopchurn", "StopChurn syncs")]
    assert [(view["name"], view["href"]) for view in plugin["external_views"]] == [("StopChurn", "stopchurn/")]
    # the app the API server mounts builds in the clean install and serves the view's icon
    assert discovered["icon"] == [200, "image/svg+xml"]


def test_airflow_stopchurn_command(installed: Installed) -> None:
    out = installed.run("airflow", "stopchurn", "--help")
    assert "airflow stopchurn" in out
    missing = [name for name in COMMANDS if f"\n    {name}" not in out]
    assert missing == [], out


def test_stopchurn_console_script(installed: Installed) -> None:
    assert (installed.venv / "bin" / "stopchurn").is_file(), "the wheel declares no stopchurn console script"
    out = installed.run("stopchurn", "--help")
    assert out.startswith("usage: stopchurn")
    missing = [name for name in COMMANDS if f"\n    {name}" not in out]
    assert missing == [], out
