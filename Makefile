# The README's commands. Everything they need is set up here, on a machine with only Python 3.11.
#   make figures   set up, train the figures' runs (two at a time on a CPU), then run every notebook at the
#                  full profile into reports/ (the main job)
#   make test      set up, then ruff, the unit tests, every notebook by papermill (smoke), nbval
#   make lab       set up, then JupyterLab on the kit
#   make pretrain  rebuild data/tiny-sd: continue data/tiny-sd-v2 by the pretraining notebook (about 1.8 h of CPU)
#   make controlnets  rebuild data/controlnets (the shipped ControlNets, trained and measured; ~40 min of CPU)
#   make architectures  rebuild data/architecture-runs (notebook 10's successor runs; about 5 h on 2 CPU cores)
#   make forecast-runs  rebuild data/forecast-runs (notebook 11's own runs: controls, new conditions, successors; ~2 h)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cnkit-installed
TEST_STAMP := $(VENV)/.cnkit-test-installed
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-test figures test test-fast lint unit notebooks nbval lab pretrain controlnets architectures forecast-runs clean

setup: $(STAMP)

# pyproject.toml is the one list of dependencies; the venv is rebuilt when it changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[hf]"
	$(PY) -m ipykernel install --sys-prefix --name cnkit --display-name "Python (cnkit)" >/dev/null
	touch $(STAMP)

# The test runners, the linter and the browser driver (the `test` extra): only `make test` needs them.
setup-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[hf,test]"
	touch $(TEST_STAMP)

figures: setup
	$(VENV)/bin/cnkit figures --profile full

test: lint unit nbval

# The unit tests without those marked slow (the SD-scale path, two-process runs, memory measurements): minutes.
test-fast: lint
	$(PY) -m pytest -q -m "not slow" tests

lint: setup-test
	$(VENV)/bin/ruff check cnkit tests bench studies

unit: setup-test
	$(PY) -m pytest -q tests

# nbval runs each notebook once, cell by cell, in notebooks/ with the smoke profile; --nbval-lax checks that cells
# run (outputs are stripped in git, so there is nothing to compare them with), and each notebook's last cell checks
# the files it declares. Runs start from nothing each time (notebooks/outputs is the notebooks' default out_dir).
nbval: setup-test
	rm -rf notebooks/outputs
	CNKIT_PROFILE=smoke $(PY) -m pytest -q --nbval-lax -p no:cacheprovider notebooks

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

# Rebuilds the embedded default from scratch (resumes when interrupted) and publishes it with its card.
pretrain: setup
	mkdir -p reports/pretrain
	$(VENV)/bin/papermill notebooks/01_pretrain_tiny_sd.ipynb reports/pretrain/01_pretrain_tiny_sd.ipynb \
		--cwd notebooks -p profile full -p out_dir $(CURDIR)/reports/pretrain/run -p publish_to $(CURDIR)/data/tiny-sd

clean:
	rm -rf reports notebooks/outputs .pytest_cache

# Trains (or reuses make figures' runs of) the shipped ControlNets, measures them and writes their cards.
controlnets: setup
	$(VENV)/bin/cnkit controlnets

# Trains notebook 10's successor runs (or reuses them, in reports/architectures/runs) and ships them in
# data/architecture-runs, which make figures reads: training them there would take it past 3 hours.
architectures: setup
	$(VENV)/bin/cnkit architectures

# Trains notebook 11's own runs (controls that never converge, conditions no other notebook uses, successors with the
# probe) and ships their tables in data/forecast-runs, which make figures reads, with those of make figures' own runs
# that carry the probe (the study's design group).
forecast-runs: setup
	$(VENV)/bin/cnkit forecast runs --figure-runs reports/full/runs
