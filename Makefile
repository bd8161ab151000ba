PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint bench demo study docs clean

install: $(STAMP)

# torch/torchvision are installed first on their own so that pip resolves them once;
# a user with their own CUDA build keeps it (the ranges in pyproject are loose).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[dev,demo,docs]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# one pytest-xdist worker per core (at most 4), whole test files per worker so that module fixtures are built once;
# tests/conftest.py gives each worker and the processes it starts its share of the threads
TEST_WORKERS ?= auto
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/bench_divergence.py

demo: $(STAMP)
	$(PY) -m abkd_vision.demo

# the small real-data study (about 30 min on 2 CPU cores; needs ../shared/data/cifar10 or --data)
study: $(STAMP)
	$(PY) -m abkd_vision.study

# the documentation site (mkdocs.yml, docs/) into site/; strict: a broken link, a missing reference or a docstring
# the API reference cannot read fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache site
