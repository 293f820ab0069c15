# coalora: `make demo` sets up and runs the pipeline on SmolLM2 + Austen; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup assets demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q llama-cpp-python==0.3.36
	$(PY) -m pip install -q -e '.[test]'
	touch $@

assets: setup
	$(VENV)/bin/coalora assets --fetch

demo: assets
	$(VENV)/bin/coalora demo

test: assets
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not integration" tests

bench: assets
	$(PY) bench/convert.py
	$(PY) bench/quality.py          # trains the runs the next three use
	$(PY) bench/ladder.py
	$(PY) bench/search.py --run bench/work/quality/runs/coa
	$(PY) bench/adapter_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
