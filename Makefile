# fedlib: the two commands of the README, and the helpers behind them.
#   make reproduce   every paper notebook at the default CPU scale -> results/quick/, figures, claims table
#   make test        unit tests + nbval over every notebook (what CI runs)
# Both create .venv and install what they need (PyPI only; pinned in constraints.txt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS := test,flower,diffusers,fid
STAMP  := $(VENV)/.fedlib-installed
SCALE  ?= quick
# nbval and the runner write figures/metrics of test runs here, not into the source tree; the cache
# starts cold so that CI times what a fresh machine would take
TESTOUT ?= $(CURDIR)/.test-output
JOBS   ?= 2

.PHONY: venv reproduce test unit nbval smoke notebook notebooks report lock fashion-mnist gpu clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	-@bash scripts/install_fashion_mnist.sh
	touch $(STAMP)

venv: $(STAMP)

fashion-mnist:
	bash scripts/install_fashion_mnist.sh

reproduce: venv
	$(BIN)/python -m fedlib reproduce --scale $(SCALE)
	$(BIN)/python -m fedlib report --scale $(SCALE)

# Unit tests and nbval in one pytest run, two workers; each notebook stays on one worker.
test: venv
	rm -rf $(TESTOUT) && mkdir -p $(TESTOUT)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 FEDLIB_FIGURES_DIR=$(TESTOUT)/figures FEDLIB_RUN_DIR=$(TESTOUT)/run FEDLIB_CACHE=$(TESTOUT)/cache \
	MPLBACKEND=Agg $(BIN)/python -m pytest -n $(JOBS) --dist loadfile --durations=15 -m "not slow" \
	  --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=900 \
	  tests notebooks

unit: venv
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile -m "not slow" tests

nbval: venv
	rm -rf $(TESTOUT) && mkdir -p $(TESTOUT)
	OMP_NUM_THREADS=1 FEDLIB_FIGURES_DIR=$(TESTOUT)/figures FEDLIB_RUN_DIR=$(TESTOUT)/run FEDLIB_CACHE=$(TESTOUT)/cache MPLBACKEND=Agg \
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --nbval-lax \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=900 notebooks

smoke: venv
	$(BIN)/python -m fedlib reproduce --scale smoke

# Re-execute one notebook from its jupytext source and commit-ready outputs:  make notebook NB=01_fedgo_weighting
# The .py is the source: the .ipynb is converted from it afresh (jupytext --sync would keep the old
# .ipynb's cell metadata, e.g. drop a new tag), then executed, and the executed copy replaces it.
notebook: venv
	test -n "$(NB)" || (echo "usage: make notebook NB=<notebook name>" && exit 2)
	$(BIN)/jupytext --to ipynb notebooks/$(NB).py
	$(BIN)/python -m fedlib reproduce $(NB) --scale quick --update-notebooks

notebooks: venv
	for f in notebooks/[0-9][0-9]_*.py; do $(BIN)/jupytext --to ipynb $$f || exit 1; done
	$(BIN)/python -m fedlib reproduce --scale quick --update-notebooks
	$(BIN)/python -m fedlib report --scale quick --readme

# On a lent GPU: every benchmark with --device cuda and every notebook's paper set as a short smoke
# (notebooks/params/*: paper_smoke) -> benchmarks/results/*-<gpu>.json and results/paper/
gpu: venv
	$(BIN)/python scripts/gpu_suite.py --device cuda --out results/paper

report: venv
	$(BIN)/python -m fedlib report --scale $(SCALE)

lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^fedlib' > constraints.new && \
	  (head -2 constraints.txt; cat constraints.new) > constraints.tmp && mv constraints.tmp constraints.txt && rm constraints.new

clean:
	rm -rf $(TESTOUT) results/smoke results/interactive
