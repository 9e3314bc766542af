# make run   — train the embedded default (smoke experiment, synthetic data, CPU)
# make test  — the test suite (what CI runs): `make docs` (the README's console blocks),
#              `make unit` (JOBS=2 worker processes), then `make acceptance` (the long runs)
# make lint  — ruff check . (pyproject.toml [tool.ruff]); CI runs it before the tests
# make cuda  — add the CUDA build of JAX (requirements-cuda.txt) to ./.venv: the GPU-compile
#              tests then run instead of skipping, and --mode=plan compiles for the GPUs
# All create ./.venv from requirements.txt on first use, with brainscale installed into it
# in place (pip install -e .: the packages and the `brainscale` command, launch/run.py).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# glibc's malloc asks for transparent huge pages (glibc >= 2.35; no effect where THP is off, and
# a GLIBC_TUNABLES of yours wins): XLA:CPU maps its scratch memory afresh for every step, and in
# 4 KB pages enigma_tiny spent a fifth of its CPU in page faults (benchmarks/RESULTS.md).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: run test docs unit acceptance lint cuda clean

$(VENV)/.installed: requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "brainscale needs Python >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.cuda-installed: requirements-cuda.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-cuda.txt
	touch $@

cuda: $(VENV)/.cuda-installed

run: $(VENV)/.installed
	$(PY) launch/run.py --experiment=smoke $(ARGS)

# Two workers, each test module whole on one (its module fixtures are made once); the
# longest modules go first (tests/conftest.py) so that both workers finish together:
# --no-loadscope-reorder, or xdist would hand out the modules with the most tests first.
JOBS ?= 2

# `make test` runs three stages, one after the other: `docs`, the README's console blocks run
# as written (tests/test_readme.py; on the plain install, it skips once `make cuda` is done);
# `unit`, everything but those and the acceptance runs, on JOBS workers; then `acceptance`,
# the tiny experiments trained to their quality bars (alone, so their time limits hold).
test: docs unit acceptance

docs: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=10 -n $(JOBS) -m readme tests/test_readme.py

unit: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=30 -n $(JOBS) --dist loadfile --no-loadscope-reorder \
	  -m "not acceptance and not readme" tests

acceptance: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=10 -m acceptance tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs brainscale.egg-info
