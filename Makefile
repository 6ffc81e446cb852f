# Two commands for a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements-dev.lock
# PYTHONDONTWRITEBYTECODE may be set: compile bytecode at install time so `import airflow` stays fast.
UV_FLAGS := --compile-bytecode --quiet

.PHONY: venv test lint typecheck check demo bench bench-large soak lock clean

# The venv is made by the standard library, then uv (pinned in the lock, so syncing keeps it) installs the
# locked set into it in seconds (plain pip takes over a minute). Nothing is installed outside .venv.
UV := $(VENV)/bin/uv

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || { $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --upgrade >/dev/null; \
		$(PY) -m pip install --quiet --disable-pip-version-check "$$(grep '^uv==' $(LOCK))"; }
	$(UV) pip sync $(UV_FLAGS) --python $(PY) $(LOCK)
	$(UV) pip install $(UV_FLAGS) --python $(PY) --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

demo: $(STAMP)
	$(PY) demo/run_demo.py

bench: $(STAMP)
	$(PY) benchmarks/run.py --rows 1000000 --profile

bench-large: $(STAMP)
	$(PY) benchmarks/run.py --rows 10000000 --large --profile

soak: $(STAMP)
	STOPCHURN_SOAK=long $(PY) -m pytest -m slow tests/test_soak.py

# Re-pin the exact dependency set after editing pyproject.toml.
lock: $(STAMP)
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 --quiet -o $(LOCK)

clean:
	rm -rf $(VENV) .airflow .demo .pytest_cache .mypy_cache .ruff_cache
