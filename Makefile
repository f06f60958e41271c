# The two commands a newcomer needs (see README):
#   make demo   set up .venv and run the demo (`flora-lab demo`) on the bundled default
#   make test   set up .venv and run the whole test suite
#   make lint   ruff check and ruff format --check on the whole repository
#   make docs   rewrite the option tables of README.md and docs/jax.md from flora_opt/hyperparams.py
# torch==2.13.0 is installed first: an unpinned torch would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.flora-opt-installed

.PHONY: demo test lint docs setup clean

# The library (flora-optim) and the lab (lab/: flora-lab, the demo, the replications, the benchmarks'
# model and data), both editable, in one pip call so that the lab's flora-optim requirement is this
# checkout.
$(STAMP): pyproject.toml lab/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[torch,jax,dev]' -e './lab[replicate]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flora-lab demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

docs: $(STAMP)
	$(PY) tools/option_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info lab/build lab/*.egg-info
