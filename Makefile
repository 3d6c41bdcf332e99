# `make demo` and `make test` set everything up on a fresh machine: they create .venv with a
# Python >= 3.12 that scripts/find_python.sh finds, install seqppl into it, and run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all lint bench docs clean

$(STAMP): pyproject.toml
	@test -x $(PY) || { interp=$$(scripts/find_python.sh) && $$interp -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/seqppl demo

# Two workers (pytest-xdist): most of the suite is single-threaded tracing and compilation.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow"

test-all: $(STAMP)
	HYPOTHESIS_PROFILE=full $(PY) -m pytest -q -n 2 --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check seqppl models tests examples benchmarks
	$(VENV)/bin/ruff format --check seqppl models tests examples benchmarks

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

docs: $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .hypothesis
