# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/anyflow-ray
STAMP  := $(VENV)/.installed
# make demo: the tiny model that follows its prompts; make bench: the tiny default of README's figures
CONFIG ?= configs/tiny-wide.yaml
BENCH_CONFIG ?= configs/tiny.yaml

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is pinned to 2.13.0 and installed first: that build is on the machine, anything else
# would pull a CUDA build of several GB.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(CLI) demo --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

bench: $(STAMP)
	$(CLI) bench --config $(BENCH_CONFIG)

clean:
	rm -rf outputs wandb .pytest_cache
