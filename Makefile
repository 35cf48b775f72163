# Two entry points (see README): `make quickstart` runs the whole pipeline on the embedded tiny default,
# `make test` runs the test suite. Both create .venv on first use (`pip install -e ".[dev]"`) and reuse it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv quickstart demo test lint memory-benchmark clean-quickstart

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e ".[dev]"
	@# pip byte-compiles on one core; compileall uses them all (about 40 s less on 2 cores). A file written for a
	@# newer Python fails to compile here as it does under pip, harmlessly: hence `|| true`.
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(PY) quickstart.py $(ARGS)

demo: $(STAMP)
	$(PY) app.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(ARGS)

# Peak memory of a training step per recipe and which GPU it fits (not part of the quickstart; docs/memory.md).
memory-benchmark: $(STAMP)
	$(PY) benchmarks/memory_benchmark.py $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

clean-quickstart:
	rm -rf outputs/quickstart
