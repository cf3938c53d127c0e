# Two commands on a fresh machine: `make repro` (the whole study, offline) and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PATH := $(CURDIR)/.venv/bin:$(PATH)
# Not HOST/PORT: shells export HOST (tcsh sets it to the machine's name).
UI_PORT ?= 5000
UI_HOST ?= 127.0.0.1
# The stages' store (README "MLflow"); point these elsewhere to browse another checkout's runs.
MLFLOW_DB ?= $(CURDIR)/mlflow.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlartifacts

.PHONY: setup lint test test-slow repro repro-paper ui bench clean-outputs dvc-deps

$(VENV_STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(VENV_STAMP)

# ruff (pinned in requirements.txt, configured in pyproject.toml): the linter, then the formatter as
# a check; both report before the target fails.
lint: $(VENV_STAMP)
	status=0; .venv/bin/ruff check . || status=1; .venv/bin/ruff format --check . || status=1; exit $$status

# The tests not marked `slow` (pyproject.toml), after installing Chromium for the tests that render
# pages: scripts/ensure_chromium.py fails the target when it cannot.
test: $(VENV_STAMP)
	$(PY) scripts/ensure_chromium.py
	$(PY) -m pytest -q

# The tests marked `slow`: end to end (`dvc repro` and `dvc exp run` on the tiny profile, every stage
# of the paper profile, stages killed and resumed) or over a minute on 2 cores. CI runs both targets.
test-slow: $(VENV_STAMP)
	$(PY) -m pytest -q -m slow

# Two runs at a time on one thread each (scripts/repro.py); REPRO_JOBS=1 is plain `dvc repro`.
repro: $(VENV_STAMP)
	$(PY) scripts/repro.py

repro-paper: $(VENV_STAMP)
	cp profiles/paper.yaml params.yaml
	$(PY) -m dvc repro

# The MLflow UI on 127.0.0.1 (`make ui UI_HOST=0.0.0.0` to share it); open the printed address.
ui: $(VENV_STAMP)
	@echo "MLflow UI: http://$(UI_HOST):$(UI_PORT)/#/experiments (classic runs table)"
	.venv/bin/mlflow server --workers 1 --host $(UI_HOST) --port $(UI_PORT) \
		--backend-store-uri sqlite:///$(MLFLOW_DB) --default-artifact-root $(MLFLOW_ARTIFACTS)

bench: $(VENV_STAMP)
	$(PY) bench/run_all.py

# Each stage's .py deps in dvc.yaml rewritten from its imports (scripts/dvc_deps.py), after a module
# is added, moved or renamed; tests/test_dvc_deps.py fails until they match.
dvc-deps: $(VENV_STAMP)
	$(PY) scripts/dvc_deps.py --write

# Rebuild DVC's offline plots page (.dvc/plots/offline.html) from npm; fails unless it matches its lock.
plots-template: $(VENV_STAMP)
	$(PY) scripts/vega_template.py
