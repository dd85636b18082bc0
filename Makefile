# `make demo` and `make test` each create the virtual environment they need, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test debian-tools clean

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

# Debian packages for tests that are skipped, with their reason, without them: Chromium opens the
# HTML report in a real browser, dicom3tools' validators check the DICOM-SEG and SR, npm installs
# the Khronos glTF validator that checks the GLB scenes (command:package)
DEBIAN_TOOLS := chromium:chromium dciodvfy:dicom3tools npm:npm
GLTF_VALIDATOR := gltf-validator@2.0.0-dev.3.10
debian-tools:
	@missing="$$(for tool in $(DEBIAN_TOOLS); do command -v $${tool%%:*} >/dev/null || echo $${tool#*:}; done)"; \
	[ -z "$$missing" ] || [ "$$(id -u)" != 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	  || echo "Could not install $$missing: the tests that need them will be skipped"

$(VENV)/node_modules/gltf-validator/package.json: | $(BIN)/python debian-tools
	npm install --prefix $(VENV) --silent --no-audit --no-fund $(GLTF_VALIDATOR) \
	  || echo "Could not install $(GLTF_VALIDATOR): the test that needs it will be skipped"

test: $(VENV)/.installed-test debian-tools $(VENV)/node_modules/gltf-validator/package.json
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo-output
