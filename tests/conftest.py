"""Every test process sees 8 simulated CPU devices (set before JAX starts)."""

import atexit
import os
import pathlib
import shutil
import tempfile
import zlib

import numpy as np
import pytest

# XLA:CPU's LLVM at -O1 instead of its default -O3, in every test process: the subprocesses
# tests start build their XLA_FLAGS with `xla_flags` too. Most tests compile tiny steps and run
# them a few times, and -O1 compiles them with about a quarter less CPU (tests/test_cwm_model.py:
# 64 s of CPU against 84); a step runs about as fast, with the same numbers (the fast-math
# flags that would let LLVM reorder float arithmetic stay off). Compiles for a GPU keep XLA's
# default level (brainscale/plan/gpu.py: compiler_options), so their registers and spills are
# the cluster's. benchmarks/RESULTS.md, "fifth session".
TEST_XLA_FLAGS = ('--xla_backend_optimization_level=1',)


def xla_flags(devices: int = 0) -> str:
  """XLA_FLAGS of a test process: TEST_XLA_FLAGS, and `devices` simulated CPU devices (0:
  XLA's one)."""
  count = [f'--xla_force_host_platform_device_count={devices}'] if devices else []
  return ' '.join([*TEST_XLA_FLAGS, *count])


os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = pathlib.Path(__file__).resolve().parent.parent

# One JAX compilation cache for the whole test run (its xdist workers inherit the folder):
# the single-process CLI runs of launch/run.py that tests start (tests/test_train.py
# cli_env) compile the same steps again and again, resumes above all. Made by the first
# pytest process of the run, removed when it exits. Not for the in-process tests: with it,
# two in-process training tests aborted in XLA (benchmarks/RESULTS.md, fourth session).
if 'BRAINSCALE_TEST_COMPILE_CACHE' not in os.environ:
  os.environ['BRAINSCALE_TEST_COMPILE_CACHE'] = tempfile.mkdtemp(prefix='brainscale-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['BRAINSCALE_TEST_COMPILE_CACHE'], True)


@pytest.fixture
def seed(request) -> int:
  """A seed of this test's own (its node id hashed): reproducible, different per test."""
  return zlib.crc32(request.node.nodeid.encode()) % (1 << 20)


@pytest.fixture
def rng(seed) -> np.random.Generator:
  return np.random.default_rng(seed)


# The longest modules first: `make test` runs each module whole on one of two xdist workers
# (--dist loadfile), and the workers finish together only if the long ones start early.
# Measured on a fresh clone's CI (2026-12-06): a long module left for last runs alone. xdist
# keeps this order only with --no-loadscope-reorder (the Makefile's unit target); by default
# it hands out the modules with the most tests first.
LONGEST_FIRST = ('test_campaign.py', 'test_train.py', 'test_gpu_compile.py', 'test_notebooks.py',
                 'test_slurm.py', 'test_cwm_probes.py', 'test_enigma.py', 'test_faults.py',
                 'test_enigma_train.py', 'test_inference.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def take(it, n: int) -> list:
  """The next n batches of an iterator."""
  return [next(it) for _ in range(n)]


def assert_batches_equal(a: list, b: list):
  """Two lists of batches hold the same keys and the same arrays."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """A folder with valid videos of several containers and codecs, and broken files
  (tests/video_helpers.py)."""
  from video_helpers import write_sources  # noqa: PLC0415  (PyAV only where videos are made)
  return write_sources(tmp_path_factory.mktemp('videos'))


@pytest.fixture(scope='module')
def imported(sources, tmp_path_factory):
  """`sources` imported into ArrayRecord shards."""
  from video_helpers import import_sources  # noqa: PLC0415  (PyAV)
  return import_sources(sources, tmp_path_factory.mktemp('imported') / 'clips')


def assert_resume_is_exact(make_iter, skip: int, n: int):
  """An iterator from make_iter() restored from its state after `skip` batches gives the
  next n batches the original gives."""
  it = make_iter()
  take(it, skip)
  state = it.get_state()
  expected = take(it, n)
  resumed = make_iter()
  resumed.set_state(state)
  assert_batches_equal(take(resumed, n), expected)


def assert_workers_match(make_iter, make_workers_iter, n: int):
  """A pipeline with worker processes gives the batches of one without (2n of them), and
  resumes from its state half-way."""
  expected = take(make_iter(), 2 * n)
  it = make_workers_iter()
  assert_batches_equal(take(it, n), expected[:n])
  state = it.get_state()
  resumed = make_workers_iter()
  resumed.set_state(state)
  assert_batches_equal(take(resumed, n), expected[n:])
