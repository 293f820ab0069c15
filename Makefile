# coalora: `make demo` sets up and runs the pipeline on SmolLM2 + Austen; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LLAMA_CPP_PYTHON := 0.3.36
CONVERTER := $(VENV)/llama.cpp
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup assets demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q llama-cpp-python==$(LLAMA_CPP_PYTHON)
	# llama.cpp's own Hugging Face converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py),
	# from the same llama-cpp-python sdist: coalora runs it to turn a model folder into a float GGUF.
	rm -rf $(VENV)/sdist $(CONVERTER) && mkdir -p $(VENV)/sdist $(CONVERTER)
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/sdist
	tar -xzf $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(CONVERTER) --strip-components=3 \
	    $(addprefix llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/,convert_hf_to_gguf.py conversion gguf-py)
	rm -rf $(VENV)/sdist
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
	$(PY) bench/quality.py --seeds 0,1,2  # trains the runs the next three use (seed 0's)
	$(PY) bench/ladder.py
	$(PY) bench/search.py --run bench/work/quality/runs/seed-0/coa
	$(PY) bench/adapter_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
