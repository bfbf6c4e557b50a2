# The two commands of the README:
#   make run    install, then run the main job on the embedded default (SmolLM2-135M, BLiMP sample)
#   make test   install with the test oracle (transformers + torch), then run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
WORKDIR ?= runs/default
CONFIG ?= configs/default.py

.PHONY: install install-test run test smoke bench

install:
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .

install-test:
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps -e .

run: install
	$(PYTHON) launch/pipeline.py --config=$(CONFIG) --workdir=$(WORKDIR)

smoke: install
	$(PYTHON) launch/pipeline.py --config=$(CONFIG):smoke --workdir=runs/smoke

test: install-test
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

bench: install-test
	$(PYTHON) bench/bench_scoring.py
