# Two entry points (see README): `make quickstart` runs the whole pipeline on the embedded tiny default,
# `make test` runs the test suite. Both create .venv on first use and reuse it afterwards.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv quickstart test clean-quickstart

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(PY) quickstart.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(ARGS)

clean-quickstart:
	rm -rf outputs/quickstart
