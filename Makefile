# make run   — train the embedded default (smoke experiment, synthetic data, CPU)
# make test  — the test suite (what CI runs), on JOBS=2 worker processes
# make cuda  — add the CUDA build of JAX (requirements-cuda.txt) to ./.venv: the GPU-compile
#              tests then run instead of skipping, and --mode=plan compiles for the GPUs
# All create ./.venv from requirements.txt on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test cuda clean

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "brainscale needs Python >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.cuda-installed: requirements-cuda.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-cuda.txt
	touch $@

cuda: $(VENV)/.cuda-installed

run: $(VENV)/.installed
	$(PY) launch/run.py --experiment=smoke $(ARGS)

# Two workers, each test module whole on one (its module fixtures are made once); the
# longest modules go first (tests/conftest.py) so that both workers finish together.
JOBS ?= 2

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=30 -n $(JOBS) --dist loadfile tests

clean:
	rm -rf $(VENV) runs
