# fedlib: the two commands of the README, and the helpers behind them.
#   make reproduce   every paper notebook at the default CPU scale -> results/quick/, figures, claims table
#   make test        unit tests + nbval over every notebook + the browser test (what CI runs)
#   make lab         JupyterLab on the notebooks, to explore them
# Each creates .venv and installs what it needs (PyPI, pinned in constraints.txt; Debian's Chromium and
# Fashion-MNIST through apt where we are root, saying so plainly where that cannot be done).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS := test,flower,diffusers,fid,lab
STAMP  := $(VENV)/.fedlib-installed
SCALE  ?= quick
# nbval and the runner write figures/metrics of test runs here, not into the source tree; the cache
# starts cold so that CI times what a fresh machine would take
TESTOUT ?= $(CURDIR)/.test-output
JOBS   ?= 2

.PHONY: venv lab reproduce test unit nbval smoke notebook notebooks report lock fashion-mnist browser gpu clean

$(STAMP): pyproject.toml constraints.txt scripts/install_packages.sh scripts/install_jupyter_settings.py scripts/jupyterlab-overrides.json
	@$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/check_python.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash scripts/install_packages.sh $(VENV) $(EXTRAS)
	$(BIN)/python scripts/install_jupyter_settings.py
	-@bash scripts/install_fashion_mnist.sh
	-@bash scripts/install_browser.sh
	touch $(STAMP)

venv: $(STAMP)

fashion-mnist:
	bash scripts/install_fashion_mnist.sh

browser:
	bash scripts/install_browser.sh

reproduce: venv
	$(BIN)/python -m fedlib reproduce --scale $(SCALE)
	$(BIN)/python -m fedlib report --scale $(SCALE)

# Unit tests, nbval and the browser test (tests/test_browser.py: screenshots in $(TESTOUT)/browser) in one
# pytest run, two workers, longest file first (conftest.py); each notebook, and the browser test, stays on one worker.
test: venv
	rm -rf $(TESTOUT) && mkdir -p $(TESTOUT)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 FEDLIB_FIGURES_DIR=$(TESTOUT)/figures FEDLIB_RUN_ROOT=$(TESTOUT)/run FEDLIB_CACHE=$(TESTOUT)/cache \
	FEDLIB_TEST_OUTPUT=$(TESTOUT) FEDLIB_TEST_DURATIONS=$(TESTOUT)/durations.json MPLBACKEND=Agg $(BIN)/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder --durations=15 -m "not slow" \
	  --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=900 \
	  tests notebooks

unit: venv
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder -m "not slow" tests

nbval: venv
	rm -rf $(TESTOUT) && mkdir -p $(TESTOUT)
	OMP_NUM_THREADS=1 FEDLIB_FIGURES_DIR=$(TESTOUT)/figures FEDLIB_RUN_ROOT=$(TESTOUT)/run FEDLIB_CACHE=$(TESTOUT)/cache MPLBACKEND=Agg \
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder --nbval-lax \
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

# JupyterLab on the notebooks (to explore; `make lab LAB_ARGS="--no-browser --port 8899"`). `jupyter trust`
# signs the committed notebooks in this user's Jupyter data folder, not in the repo: Lab renders the
# saved widgets (the explorers) of trusted notebooks only, and shows text such as `interactive(...` otherwise.
lab: venv
	$(BIN)/jupyter trust --log-level=WARN notebooks/[0-9][0-9]_*.ipynb
	$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks \
	  $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# On a lent GPU: every benchmark with --device cuda and every notebook's paper set as a short smoke
# (notebooks/params/*: paper_smoke) -> benchmarks/results/*-<gpu>.json and results/paper/
gpu: venv
	$(BIN)/python scripts/gpu_suite.py --device cuda --out results/paper

report: venv
	$(BIN)/python -m fedlib report --scale $(SCALE)

# Rewrite the pins from what .venv holds, keeping constraints.txt's leading comment (its header).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^fedlib' -e '^#' > constraints.new && \
	  (sed -n '/^#/!q;p' constraints.txt; cat constraints.new) > constraints.tmp && mv constraints.tmp constraints.txt && rm constraints.new

clean:
	rm -rf $(TESTOUT) results/smoke results/interactive
