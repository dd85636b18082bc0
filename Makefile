# `make demo` and `make test` each create the virtual environment they need, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-engine: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# TotalSegmentator only for its label -> SNOMED CT table; its own dependencies would downgrade vtk
	$(BIN)/python -m pip install --quiet --no-deps totalsegmentator==2.18.0
	touch $@ $(VENV)/.installed-engine

demo: $(VENV)/.installed-engine
	$(BIN)/aireconstruct demo --output demo-output

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo-output
