"""Where generated data lives ($BRAINSCALE_DATA, default ~/.cache/brainscale), made once.

Synthetic datasets are named by a hash of their spec and of the source of the modules
that make them, so every experiment that asks for the same data shares one copy, and a
change to the generator makes it afresh instead of reusing a stale one. Process 0 makes
it; the others wait.
"""

import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib

import jax
from jax.experimental import multihost_utils


def root() -> pathlib.Path:
  return pathlib.Path(os.environ.get('BRAINSCALE_DATA') or
                      pathlib.Path.home() / '.cache' / 'brainscale')


def spec_of(section, spec_class):
  """The frozen dataclass `spec_class` from a config section's matching keys (lists -> tuples)."""
  fields = {f.name for f in dataclasses.fields(spec_class)}
  return spec_class(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                       for k, v in section.to_dict().items() if k in fields})


def named(prefix: str, spec: dict, makers: tuple) -> pathlib.Path:
  """root()/prefix_<12 hex digits of a hash of the spec and of the makers' source files>
  (`makers`: the modules whose code decides the data's bytes)."""
  key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
  for module in makers:
    key.update(pathlib.Path(module.__file__).read_bytes())
  return root() / f'{prefix}_{key.hexdigest()[:12]}'


def make_once(directory: pathlib.Path, done: str, make) -> pathlib.Path:
  """Calls make() on process 0 unless directory/done exists; every process waits for it.

  A lock beside the directory keeps two jobs on one machine from making it at once.
  """
  if jax.process_index() == 0 and not (directory / done).exists():
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f'.{directory.name}.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not (directory / done).exists():
        make()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'data {directory.name}')
  return directory
