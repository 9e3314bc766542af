"""Every test process sees 8 simulated CPU devices (set before JAX starts)."""

import os
import pathlib
import zlib

import numpy as np
import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def seed(request) -> int:
  """A seed of this test's own (its node id hashed): reproducible, different per test."""
  return zlib.crc32(request.node.nodeid.encode()) % (1 << 20)


@pytest.fixture
def rng(seed) -> np.random.Generator:
  return np.random.default_rng(seed)


# The longest modules first: `make test` runs each module whole on one of two xdist workers
# (--dist loadfile), and the workers finish together only if the long ones start early.
LONGEST_FIRST = ('test_enigma_train.py', 'test_gpu_compile.py', 'test_slurm.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
