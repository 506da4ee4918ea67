# The two commands of README.md: `make demo` and `make test`. Each creates its
# own virtual environment in .venv and installs what it needs from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/digits
DEMO_WORKDIR ?= runs/digits

.PHONY: demo test test-fast lint clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "trainer needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.cpu: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[cpu]"
	touch $@

$(VENV)/.test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[cpu,test]"
	touch $@

$(DEMO_DATA)/manifest.json: | $(VENV)/.cpu
	$(PY) -m trainer convert --sample=digits --out=$(DEMO_DATA)

# Train jobs/digits.toml on CPU into a local workdir. Running it again resumes an
# interrupted run, or prints the summary of a completed one.
demo: $(VENV)/.cpu $(DEMO_DATA)/manifest.json
	$(PY) -m trainer train --job=jobs/digits.toml --workdir=$(DEMO_WORKDIR)

# Two pytest workers (pytest-xdist): most of the suite waits on subprocesses
# that import TensorFlow. Tests that share an expensive run are kept on one
# worker by their xdist_group. The 20 slowest are listed at the end: where
# the suite's time goes, in every CI log.
PYTEST_WORKERS ?= 2
test: $(VENV)/.test
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=20

# The inner loop: everything but the slow marker (trainings in subprocesses,
# notebooks, multi-process runs); CI runs the whole suite.
test-fast: $(VENV)/.test
	$(PY) -m pytest -m "not slow" -n $(PYTEST_WORKERS) --dist loadgroup

lint: $(VENV)/.test
	$(VENV)/bin/ruff check trainer tests benchmarks
	$(VENV)/bin/ruff format --check trainer tests benchmarks

clean:
	rm -rf $(VENV) data runs
