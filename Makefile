# `make demo` and `make test` each create the virtual environment they need, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test browser clean

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

# Debian's Chromium, for the test that opens the HTML report in a real browser (skipped without it)
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "Chromium could not be installed: the report's browser test will be skipped"

test: $(VENV)/.installed-test browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo-output
