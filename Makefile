# The README's two commands. Both build .venv with python3 and install the package into it;
# `make test PYTHON=python3.12` builds and uses .venv-python3.12 instead (one venv per Python).
PYTHON ?= python3
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test lint install bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)/dlrm
	$(PY) -m launch.train_dlrm --config=launch/configs/synthetic_small.py --workdir=$(DEMO_DIR)/dlrm

lint: $(STAMP)
	$(VENV)/bin/ruff check . --extend-exclude '.venv-*'

test: lint
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[torch]'
	$(PY) benchmarks/dlrm_throughput.py

clean:
	rm -rf $(VENV) runs *.egg-info
