# Two commands for a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements-dev.lock
# PYTHONDONTWRITEBYTECODE may be set: compile bytecode at install time so `import airflow` stays fast.
UV_FLAGS := --compile-bytecode --quiet

.PHONY: venv venv-mysql dist docs test test-deploy test-matrix test-matrix-oldest lint typecheck check demo bench bench-events-export bench-large bench-huge bench-pushdown soak lock lock-matrix clean

# The venv is made by the standard library, then uv (pinned in the lock, so syncing keeps it) installs the
# locked set into it in seconds (plain pip takes over a minute). Nothing is installed outside .venv.
UV := $(VENV)/bin/uv

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || { $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --upgrade >/dev/null; \
		$(PY) -m pip install --quiet --disable-pip-version-check "$$(grep '^uv==' $(LOCK))"; }
	$(UV) pip sync $(UV_FLAGS) --python $(PY) $(LOCK)
	$(UV) pip install $(UV_FLAGS) --python $(PY) --no-deps -e .
	@# the build leaves an egg-info here; run from this folder, Python would see the package twice and Airflow
	@# would load its plugin twice ("Plugin 'stopchurn' already registered"); the installed dist-info suffices
	@rm -rf airflow_provider_stopchurn.egg-info
	@touch $(STAMP)

venv: $(STAMP)

# The MySQL driver (mysqlclient) ships no Linux wheel, so it stays out of the default set: this adds the mysql
# extra at the versions of requirements-mysql.lock (the dev set plus it). It needs a C compiler and the client
# headers; as root it installs them with apt when missing. Without it the MySQL tests skip with the reason.
MYSQL_STAMP := $(VENV)/.mysql-installed
MYSQL_SYSTEM_PACKAGES := default-libmysqlclient-dev pkg-config build-essential
$(MYSQL_STAMP): requirements-mysql.lock $(STAMP)
	@tools/system-packages.sh mysql
	@pkg-config --exists mysqlclient 2>/dev/null || command -v mysql_config >/dev/null || \
		{ echo "mysqlclient needs: apt-get install $(MYSQL_SYSTEM_PACKAGES) (as root)"; exit 1; }
	$(UV) pip install $(UV_FLAGS) --python $(PY) -r requirements-mysql.lock
	@touch $(MYSQL_STAMP)

venv-mysql: $(MYSQL_STAMP)

# The sdist and the wheel (built from the sdist, as an installer from an index would) in dist/, both checked the
# way an upload would be. The build's own environment comes from uv's cache, as the venv does.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --installer uv --outdir dist .
	@rm -rf airflow_provider_stopchurn.egg-info  # the sdist step writes it here (see venv)
	$(PY) -m twine check --strict dist/*

# The Debian packages the tests drive are installed first when this user can (root or passwordless sudo; see
# tools/system-packages.sh), and the MySQL driver with them; otherwise their tests skip with the reason.
test: $(STAMP)
	@tools/system-packages.sh test
	@if pkg-config --exists mysqlclient 2>/dev/null || command -v mysql_config >/dev/null; then \
		$(MAKE) --no-print-directory venv-mysql; fi
	$(PY) -m pytest $(PYTEST_ARGS)

# A real multi-worker deployment on 127.0.0.1 (tests/test_deploy.py, marked deploy, left out of `make test`): the
# CeleryExecutor with two workers, PostgreSQL, Debian's redis-server and moto's S3 server; about 2 minutes.
# Without redis-server or PostgreSQL it fails rather than skips, and pytest fails when no test ran.
test-deploy: $(STAMP)
	@tools/system-packages.sh deploy
	STOPCHURN_REQUIRE_DEPLOY=1 $(PY) -m pytest -m deploy tests/test_deploy.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

# The documentation site from docs/ (mkdocs.yml) into site/; --strict fails on any warning (a broken link or
# anchor, a page outside the nav, a docstring mkdocstrings cannot read).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

demo: $(STAMP)
	$(PY) demo/run_demo.py

# make bench / bench-large / bench-huge each end with issue 22's table for their scale (benchmarks/scale.py), printed
# and appended to benchmarks/RESULTS-scale.md; see benchmarks/README.md
bench: $(STAMP)
	$(PY) benchmarks/run.py --rows 1000000 --events --export
	$(PY) benchmarks/scale.py bench

# the event and historical-export scenarios alone (benchmarks/RESULTS-events-export.md)
bench-events-export: $(STAMP)
	$(PY) benchmarks/run.py --rows 1000000 --events --export

bench-large: $(STAMP)
	$(PY) benchmarks/scale.py large --duckdb-rows $(PUSHDOWN_DUCKDB_ROWS) --duckdb-memory-limit $(DUCKDB_MEMORY_LIMIT)

# the 50M-row worker path (about 17.5 GB of free disk and 13 minutes on 2 cores; it refuses to start with less disk)
HUGE_ROWS ?= 50000000
bench-huge: $(STAMP)
	$(PY) benchmarks/scale.py huge --rows $(HUGE_ROWS)

# the diff inside the warehouse alone (benchmarks/RESULTS-pushdown.md): PostgreSQL and Spark at PUSHDOWN_ROWS, DuckDB
# at PUSHDOWN_DUCKDB_ROWS; e.g. `make bench-pushdown PUSHDOWN_DUCKDB_ROWS=30000000` on a slow machine
PUSHDOWN_ROWS ?= 10000000
PUSHDOWN_DUCKDB_ROWS ?= 100000000
# bench-large's DuckDB memory_limit: issue 22's target (the 100M-row churn run under 1 GB)
DUCKDB_MEMORY_LIMIT ?= 1GB
bench-pushdown: $(STAMP)
	$(PY) benchmarks/run.py --pushdown --rows $(PUSHDOWN_ROWS) --duckdb-rows $(PUSHDOWN_DUCKDB_ROWS)

soak: $(STAMP)
	STOPCHURN_SOAK=long $(PY) -m pytest -m slow tests/test_soak.py

# Re-pin the exact dependency set after editing pyproject.toml.
lock: $(STAMP)
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 --quiet -o $(LOCK)
	$(UV) pip compile pyproject.toml --extra dev --extra mysql --python-version 3.11 --quiet -o requirements-mysql.lock
	@rm -rf airflow_provider_stopchurn.egg-info  # resolving the project builds it here (see venv)

# --- Airflow version matrix --------------------------------------------------------------------------------------
# Every supported Airflow minor, tested at its newest patch. The newest minor is the main venv (requirements-dev.lock);
# each older one gets .venv-airflow-<minor>/ from requirements-airflow-<minor>.lock. `make test-matrix` runs the
# tests marked `matrix` (pyproject.toml) on each: `make test-matrix MATRIX=3.1` runs one.
AIRFLOW_MINORS := 3.1 3.2 3.3
NEWEST_MINOR := 3.3
OLDEST_MINOR := $(firstword $(AIRFLOW_MINORS))
OLDER_MINORS := $(filter-out $(NEWEST_MINOR),$(AIRFLOW_MINORS))
MATRIX ?= $(AIRFLOW_MINORS)
# A matrix lock resolves requirements-airflow-<minor>.in as of the day after that patch's release, so it holds what
# existed when Airflow made that release's constraints file (which cannot be fetched here). Without it, today's
# fastapi, pydantic and cadwyn break Airflow 3.2.2's in-process execution API (dag.test() fails).
LOCK_DATE_3.1 := 2026-03-12
LOCK_DATE_3.2 := 2026-05-30
# Lint and type-check tools stay in the main venv only, and pyspark (no Spark test is `matrix`; its tests skip without it).
MATRIX_NO_EMIT := $(addprefix --no-emit-package ,ruff mypy pandas-stubs types-requests uv pyspark py4j)
matrix_stamp = $(if $(filter $(NEWEST_MINOR),$(1)),$(STAMP),.venv-airflow-$(1)/.installed)

.venv-airflow-%/.installed: requirements-airflow-%.lock pyproject.toml | $(STAMP)
	@test -x $(@D)/bin/python || $(PYTHON) -m venv --without-pip $(@D)
	$(UV) pip sync $(UV_FLAGS) --python $(@D)/bin/python $<
	$(UV) pip install $(UV_FLAGS) --python $(@D)/bin/python --no-deps -e .
	@touch $@

test-matrix: $(foreach minor,$(MATRIX),$(call matrix_stamp,$(minor)))
	@set -e; for minor in $(MATRIX); do \
		case $$minor in $(NEWEST_MINOR)) python=$(PY);; *) python=.venv-airflow-$$minor/bin/python;; esac; \
		echo "=== Airflow $$($$python -c 'import importlib.metadata as m; print(m.version("apache-airflow"))')"; \
		$$python -m pytest -m matrix $(PYTEST_ARGS); \
	done

# What CI runs besides `make test` (the whole suite on the newest minor): the whole matrix does not fit in CI's
# time (README: "Supported Airflow versions").
test-matrix-oldest:
	$(MAKE) test-matrix MATRIX="$(OLDEST_MINOR)"

# Re-pin the matrix locks (after editing pyproject.toml or a requirements-airflow-*.in).
lock-matrix: $(STAMP)
	$(foreach minor,$(OLDER_MINORS),\
		$(UV) pip compile pyproject.toml requirements-airflow-$(minor).in --extra dev --python-version 3.11 \
		--exclude-newer $(LOCK_DATE_$(minor)) $(MATRIX_NO_EMIT) --quiet -o requirements-airflow-$(minor).lock &&) true
	@rm -rf airflow_provider_stopchurn.egg-info

clean:
	rm -rf $(VENV) .venv-airflow-* .airflow .demo .pytest_cache .mypy_cache .ruff_cache site
