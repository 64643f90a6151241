# Two entry points: `make demo` (the main job, offline) and `make test` (lint, types, tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOC_MODULES := normkit normkit.nn normkit.init normkit.enorm normkit.optim normkit.graph normkit.geometry \
	normkit.train normkit.integrations

.PHONY: demo test lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

# The default suite: 9 arms x 5 seeds on digits (65 s of CPU), the results table printed at the end.
demo: $(STAMP)
	$(VENV)/bin/normkit compare --out runs/compare-default

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run

docs: $(STAMP)
	$(PY) -m pdoc --docformat google -o docs/api $(DOC_MODULES)

clean:
	rm -rf $(VENV) docs/api build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
