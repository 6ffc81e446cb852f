"""The package's layout is the one the design document draws, and no module outgrows one idea.

``docs/design.md`` ("The package") shows the tree: one line per folder and per module at the package's root,
each with its job. These tests keep the document and the folders in step, and hold every module to 500 lines,
except the few the document names under "Modules over 500 lines", each with its reason, which stay under 600.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "airflow_provider_stopchurn"
DESIGN = ROOT / "docs" / "design.md"
LIMIT = 500
HARD_LIMIT = 600


def _section(title: str) -> str:
    text = DESIGN.read_text()
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, flags=re.M | re.S)
    assert match, f"docs/design.md has no section {title!r}"
    return match.group(1)


def _tree() -> dict[str, str]:
    """The entries of the drawn tree (``source/``, ``options.py``) and the job written beside each."""
    block = re.search(r"```text\nairflow_provider_stopchurn/\n(.*?)```", _section("The package"), flags=re.S)
    assert block, "the section 'The package' draws the tree in a ```text block"
    entries = {}
    for line in block.group(1).splitlines():
        match = re.match(r"^  (\S+)\s{2,}(\S.*)$", line)
        assert match, f"a line of the tree is not '  <entry>  <job>': {line!r}"
        entries[match.group(1)] = match.group(2)
    return entries


def _over_limit_named() -> dict[str, str]:
    """The modules the design document allows past 500 lines, each with its reason."""
    named = {}
    for line in _section("Modules over 500 lines").splitlines():
        match = re.match(r"^- `([\w/]+\.py)`: (\S.*)$", line)
        if match:
            named[match.group(1)] = match.group(2)
    return named


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_the_drawn_tree_is_the_package() -> None:
    on_disk = {
        f"{p.name}/" if p.is_dir() else p.name
        for p in PACKAGE.iterdir()
        if p.name != "__pycache__" and (p.is_dir() or p.suffix == ".py") and p.name != "__init__.py"
    }
    assert set(_tree()) == on_disk


def test_every_folder_says_its_job_in_its_first_docstring_line() -> None:
    for entry in _tree():
        if not entry.endswith("/"):
            continue
        init = PACKAGE / entry / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{entry}__init__.py has no docstring saying what the folder is"


def test_every_module_has_a_docstring() -> None:
    missing = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not missing


def test_no_module_passes_500_lines_unless_the_design_names_it_and_why() -> None:
    named = _over_limit_named()
    too_long = {
        str(p.relative_to(PACKAGE)): _lines(p)
        for p in sorted(PACKAGE.rglob("*.py"))
        if _lines(p) > LIMIT and str(p.relative_to(PACKAGE)) not in named
    }
    assert not too_long, f"modules over {LIMIT} lines that docs/design.md does not name: {too_long}"
    for module in named:
        path = PACKAGE / module
        assert path.is_file(), f"docs/design.md names {module}, which is gone"
        assert LIMIT < _lines(path) <= HARD_LIMIT, f"{module} has {_lines(path)} lines"


#: The package's parts from the bottom up: a module may import its own folder and the parts of lower rows only.
#: ``(root)`` is the package's own modules (``options``, ``exceptions``, ``assets``, the provider info).
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(row)
    for row in (
        ("(root)",),
        ("source", "api"),
        ("encode", "store", "sandbox"),
        ("update",),
        ("events", "export", "warehouse"),
        ("hooks",),
        ("operators",),
        ("plugins", "cli", "pushdown"),
    )
)


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "(root)"
    return parts[1] if (PACKAGE / parts[1]).is_dir() else "(root)"


def _rank(part: str) -> int:
    return next(i for i, row in enumerate(LAYERS) if part in row)


def test_every_folder_has_its_row_in_the_layers() -> None:
    folders = {entry.rstrip("/") for entry in _tree() if entry.endswith("/")}
    assert folders | {"(root)"} == set().union(*LAYERS)


def test_imports_run_one_way_from_the_airflow_side_down_to_the_sources() -> None:
    from tests.test_import_graph import _graph

    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _part(module) != _part(target) and _rank(_part(target)) >= _rank(_part(module))
    )
    assert not upward, "imports that do not run down the layers of docs/design.md: " + "; ".join(upward)


def test_the_warehouse_diffs_former_import_path_still_imports_and_says_where_it_moved() -> None:
    import importlib
    import subprocess
    import sys
    import warnings

    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n    import airflow_provider_stopchurn.pushdown\nexcept DeprecationWarning as w:\n    print(w)\n"
    )
    warned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "moved to airflow_provider_stopchurn.warehouse" in warned.stdout
    with warnings.catch_warnings():  # said above; an import in this process warns only the first time
        warnings.simplefilter("ignore", DeprecationWarning)
        old = importlib.import_module(f"{PACKAGE.name}.pushdown")
    new = importlib.import_module(f"{PACKAGE.name}.warehouse")
    assert {name: getattr(old, name) for name in new.__all__} == {name: getattr(new, name) for name in new.__all__}
    spark = importlib.import_module(f"{PACKAGE.name}.pushdown.spark")
    assert spark.SparkWarehouse is importlib.import_module(f"{PACKAGE.name}.warehouse.spark").SparkWarehouse
