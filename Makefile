# make run   — train the embedded default (smoke experiment, synthetic data, CPU)
# make test  — the test suite (what CI runs): `make docs` (the README's console blocks),
#              then every other test on JOBS=2 worker processes, the long runs among them
#              (`make unit` runs all but those, `make acceptance` those alone)
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
XDIST := -n $(JOBS) --dist loadfile --no-loadscope-reorder

# `make test` runs two stages: `docs`, the README's console blocks run as written
# (tests/test_readme.py; on the plain install, it skips once `make cuda` is done); then every
# other test on JOBS workers. The first module handed out is test_enigma_train.py, whose
# acceptance runs train enigma_tiny to its quality bars (~17 minutes alone, using ~1.7 of 2
# cores); the other worker runs the rest beside it, so no core idles (benchmarks/RESULTS.md).
# `unit` and `acceptance` run the two kinds apart.
test: docs
	$(PY) -m pytest -q -ra --durations=30 $(XDIST) -m "not readme" tests

docs: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=10 -n $(JOBS) -m readme tests/test_readme.py

unit: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=30 $(XDIST) -m "not acceptance and not readme" tests

acceptance: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=10 -m acceptance tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs brainscale.egg-info
