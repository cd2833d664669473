# emerdiff — one command sets up, one tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
MODEL  ?= reference
DEVICE ?= cpu

.PHONY: setup test test-browser lint lab notebooks bench figures figures-plan clean FORCE

$(PY):
	$(PYTHON) -m venv $(VENV)

# Idempotent: pip skips what is already installed; the stamp tracks pyproject.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev,notebooks]"
	$(PY) -m ipykernel install --sys-prefix --name emerdiff --display-name "Python (emerdiff)"
	touch $@

# Outputs never reach git: .gitattributes routes notebooks/*.ipynb through this clean filter (cell ids kept,
# as notebooks/_build.py writes them), so a notebook saved with outputs by a plain `jupyter lab` is staged
# without them. Set on every `make setup`, cheap and idempotent; outside a git checkout it does nothing.
setup: $(VENV)/.installed
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
		git config filter.nbstripout.clean '"$(abspath $(VENV))/bin/nbstripout" --keep-id' && \
		git config filter.nbstripout.smudge cat; fi

# Two pytest-xdist worker processes, one torch thread each (tests/conftest.py): on the 2-core CI
# machine both cores work and the suite takes about half the time. worksteal: each worker starts on
# its own half of the tests, in order (a module's fixtures are mostly built once), and takes over
# the other's leftovers when it runs dry. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

# pyflakes, import order and pyupgrade rules (pyproject [tool.ruff]); CI fails on any finding
lint: setup
	$(VENV)/bin/ruff check .

# The inspector notebook in JupyterLab, driven by headless chromium (apt: chromium chromium-driver).
# Screenshots in runs/browser-test/. `-m browser` selects what the default run deselects.
test-browser: setup
	$(PY) -m pytest -m browser tests/test_browser.py

# Saving strips outputs from the tracked notebooks (kept in notebooks/executed/lab/); figures of
# hand-run notebooks go to figures/lab/. Both are ignored by git.
# JupyterLab refuses to start as root without --allow-root, and root is the usual user in a container:
# pass it then. LAB_ARGS adds anything else (e.g. LAB_ARGS='--no-browser --port 8890').
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
LAB_ARGS ?=
lab: setup
	$(VENV)/bin/jupyter lab --config=notebooks/jupyter_server_config.py $(LAB_ROOT) $(LAB_ARGS) notebooks/

# The notebooks' source is notebooks/NN_name.py (jupytext percent format: linted, readable diffs);
# NN_name.ipynb beside it is generated from it, outputs stripped (notebooks/README.md).
NOTEBOOK_SOURCES := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))

notebooks: $(NOTEBOOK_SOURCES:.py=.ipynb)

notebooks/%.ipynb: notebooks/%.py | $(VENV)/.installed
	$(PY) notebooks/_build.py $<

bench: setup
	$(PY) benchmarks/bench_segment.py

# ---------------------------------------------------------------- figures
# Each study notebook runs through papermill into notebooks/executed/ and writes
# its figures (PNG + PDF) and a JSON sidecar into $(FIG_DIR). A stamp per
# notebook depends on the notebook (regenerated from its .py first), the package
# sources and the parameters, so re-running redoes only what changed; a failing
# cell fails the target (papermill prints the cell's error). Settings follow the
# model inside each notebook (emerdiff.notebook.lab.setup -> EmerDiffConfig.for_model, the
# one preset table emerdiff.config.PRESETS), so `make figures MODEL=/path/to/sd-v1-5 DEVICE=cuda`
# runs the paper's settings; FIG_PARAMS='-p num_clusters 25' overrides any parameter.
#
# PROFILE=quick (the default) or full (emerdiff/notebook/profiles.py): quick draws the same figures from
# fewer sweep points (notebook 02's t_f and t_m sweeps at 10 and 6 points spread over the schedule instead
# of all 50, 01's three modulation layers nearest the paper's, 07's four validation scenes); full runs the
# notebooks as written (`make figures PROFILE=full`). Before it starts, make prints each notebook's expected
# time for the profile, model and device and the total (profiles.ESTIMATES, measured by
# benchmarks/bench_figures.py): reference model, CPU: about 11 min quick, about 36 min full.
FIG_DIR    ?= figures
EXEC_DIR   ?= notebooks/executed
KERNEL     ?= emerdiff
PROFILE    ?= quick
NOTEBOOKS  := $(NOTEBOOK_SOURCES:.py=.ipynb)
FIG_STAMPS := $(patsubst notebooks/%.ipynb,$(EXEC_DIR)/%.stamp,$(NOTEBOOKS))
FIG_PARAMS ?=
FIG_ARGS   := -p model $(MODEL) -p device $(DEVICE) -p output_dir $(abspath $(FIG_DIR)) $(FIG_PARAMS)
# every module of the package, subpackages included: a change anywhere redoes the figures
PACKAGE_SOURCES := $(sort $(wildcard emerdiff/*.py emerdiff/*/*.py emerdiff/*/*/*.py))

figures: $(FIG_STAMPS)

# Rewritten only when the parameters change, so a new MODEL/DEVICE/PROFILE redoes every notebook.
$(EXEC_DIR)/params.txt: FORCE
	@mkdir -p $(EXEC_DIR)
	@echo 'PROFILE=$(PROFILE) $(FIG_ARGS)' | cmp -s - $@ || echo 'PROFILE=$(PROFILE) $(FIG_ARGS)' > $@

# The expected-time table (an unknown PROFILE stops here); up-to-date notebooks are marked and not counted.
figures-plan: $(EXEC_DIR)/params.txt | $(VENV)/.installed
	@$(PY) -m emerdiff.notebook.profiles plan --profile $(PROFILE) --model $(MODEL) --device $(DEVICE) \
		--stamps $(EXEC_DIR) --params-file $(EXEC_DIR)/params.txt $(NOTEBOOKS)

# The profile's parameters go in a papermill -f file; the -p of FIG_ARGS (FIG_PARAMS) override them.
$(EXEC_DIR)/%.stamp: notebooks/%.ipynb $(PACKAGE_SOURCES) $(EXEC_DIR)/params.txt | $(VENV)/.installed figures-plan
	@mkdir -p $(EXEC_DIR) $(FIG_DIR)
	@$(PY) -m emerdiff.notebook.profiles params --profile $(PROFILE) $* $(EXEC_DIR)/$*.profile.yaml
	$(VENV)/bin/papermill --kernel $(KERNEL) --log-level WARNING \
		$< $(EXEC_DIR)/$*.ipynb -f $(EXEC_DIR)/$*.profile.yaml $(FIG_ARGS)
	touch $@

FORCE:

clean:
	rm -rf notebooks/executed .pytest_cache
