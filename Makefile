# emerdiff — one command sets up, one tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
MODEL  ?= tiny
DEVICE ?= cpu

.PHONY: setup test lab bench figures clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Idempotent: pip skips what is already installed; the stamp tracks pyproject.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name emerdiff --display-name "Python (emerdiff)"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

bench: setup
	$(PY) benchmarks/bench_segment.py

clean:
	rm -rf notebooks/executed .pytest_cache
