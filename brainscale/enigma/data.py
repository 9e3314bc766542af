"""Enigma's data: the neural store a config names, its sessions, the window pipeline and the
batch layout (brainscale/data/neural/ reads and writes stores).

`config.data.root` names a store made by an importer; empty means the embedded default,
a simulated V1 population generated once into $BRAINSCALE_DATA.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from brainscale import config as config_lib
from brainscale.data import cache, neural
from brainscale.data.synthetic import v1, v1_files


def store_root(c) -> str:
  """The store of config `c`: data.root, or the synthetic population (generated once)."""
  if c.data.root:
    return c.data.root
  spec = cache.spec_of(c.data.synthetic, v1.Spec)
  root = cache.named('enigma_synthetic', dataclasses.asdict(spec), (v1, v1_files))

  def make():
    print(f'brainscale: simulating the V1 population into {root} (once)', flush=True)
    v1_files.generate(root, spec, overwrite=True)

  return str(cache.make_once(root, 'catalog.json', make))


def open_store(c) -> neural.Store:
  """The store of `c`, checked against the rate and frame shape the config expects."""
  store, d = neural.Store(store_root(c)), c.data
  if abs(store.rate - d.rate) > 1e-6 or tuple(store.frame_shape) != tuple(d.frame_shape):
    raise config_lib.ConfigError(
        f'store {store.root} has rate {store.rate} Hz and frames {tuple(store.frame_shape)}; '
        f'this config expects data.rate={d.rate}, data.frame_shape={tuple(d.frame_shape)}')
  return store


def held_out(c) -> tuple[str, ...]:
  """Sessions kept out of training: data.holdout, and on the simulated population (no
  data.root) also data.synthetic.holdout, the sessions of it an experiment keeps for
  adaptation. An imported store keeps none out unless data.holdout names them."""
  d = c.data
  return tuple(d.holdout) + (() if d.root else tuple(d.synthetic.get('holdout', ())))


def sessions(c, store: neural.Store) -> list[str]:
  """Sessions the run trains on: data.sessions, or all but held_out(c)."""
  d, available, held = c.data, store.session_names, held_out(c)
  missing = [s for s in held if s not in available]
  if missing:
    key, value = (('data.holdout', tuple(d.holdout)) if set(missing) & set(d.holdout) else
                  ('data.synthetic.holdout', tuple(d.synthetic.holdout)))
    raise config_lib.ConfigError(
        f'{key}={value}: {", ".join(map(repr, missing))} is not a session of the store '
        f'{store.root}; its sessions are {available} ({key}=() holds none out)')
  names = list(d.sessions) or [s for s in available if s not in held]
  unknown = sorted(set(names) - set(available))
  if unknown:
    raise config_lib.ConfigError(f'data.sessions {unknown} not in the store; it has '
                                 f'{available}')
  if not names:
    raise config_lib.ConfigError(
        f'data.sessions={tuple(d.sessions)} and held-out sessions {held} leave no '
        f'session to train on; the store {store.root} has {available}')
  return names


def sessions_line(c, store: neural.Store) -> str:
  """One line for start-up: the sessions trained on and those held out, and why."""
  names, held = sessions(c, store), held_out(c)
  where = f'store {c.data.root}' if c.data.root else 'the simulated V1 population'
  why = ('data.holdout' if c.data.root else 'data.holdout, data.synthetic.holdout')
  kept = f'held out: {", ".join(held)} ({why})' if held else 'held out: none'
  return f'enigma: training on {len(names)} sessions of {where}; {kept}'


def check_eval_tiers(c, store: neural.Store):
  """Raises at start-up unless data.eval_tiers holds a window in the sessions trained on."""
  d, names = c.data, sessions(c, store)
  index = neural.windows(store, tiers=tuple(d.eval_tiers), window=d.window, stride=d.stride,
                         sessions=names)
  if not len(index):
    tiers = neural.tier_counts(store, names)
    raise config_lib.ConfigError(
        f'data.eval_tiers={tuple(d.eval_tiers)}: no window of {d.window} samples fits inside '
        f'a trial of these tiers in sessions {names} of {store.root} (their trials: '
        f'{tiers}); import the data with held-out trials, or set data.eval_tiers to tiers it has')


def pipeline(c, store: neural.Store, *, tiers, train: bool, seed: int, batch_size: int,
             process_index: int, process_count: int):
  """Batches of windows of the given trial tiers (neural.pipeline) for this process."""
  d = c.data
  return neural.pipeline(
      store.root, seed=seed, batch_size=batch_size, process_index=process_index,
      process_count=process_count, window=d.window, stride=d.stride, tiers=tuple(tiers),
      max_neurons=d.max_neurons, min_neurons=d.min_neurons, train=train,
      workers=d.workers if train else 0, prefetch=d.prefetch, sessions=sessions(c, store))


def batch_shapes(c, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch layout: every entry of a window batch, as neural.example makes it."""
  d, f32, i32 = c.data, jnp.float32, jnp.int32
  w, m, ch = d.window, d.max_neurons, len(neural.CHANNELS)
  shape = lambda dims, dtype: jax.ShapeDtypeStruct((batch_size,) + dims, dtype)
  return {'responses': shape((w, m), f32), 'responses_mask': shape((w, m), jnp.bool_),
          'neurons': shape((m,), i32), 'neuron_mask': shape((m,), jnp.bool_),
          'positions': shape((m, 3), f32), 'session': shape((), i32), 'animal': shape((), i32),
          'frames': shape((w,) + tuple(d.frame_shape), jnp.uint8),
          'frames_mask': shape((w,), jnp.bool_), 'behavior': shape((w, ch), f32),
          'behavior_mask': shape((w, ch), jnp.bool_), 'times': shape((w,), f32),
          'trial': shape((), i32), 'start': shape((), i32)}


def table_sizes(c, store) -> tuple[int, int, int]:
  """(neurons, sessions, animals) the model's tables hold: model.neurons/sessions/animals, or
  the store's counts when any is unset (`store` is called to open it only then)."""
  m = c.model
  if m.neurons and m.sessions and m.animals:
    return m.neurons, m.sessions, m.animals
  s = store()
  return s.num_neurons, len(s.session_names), len(s.animals)


def synthetic_batch(c, tables: tuple[int, int, int], batch_size: int, seed: int = 0) -> dict:
  """A batch of `batch_shapes` with random content: full windows of every modality, neurons,
  sessions and animals drawn from the model's `tables` (table_sizes)."""
  rng, shapes = np.random.default_rng(seed), batch_shapes(c, batch_size)
  neurons, sessions_, animals = tables
  b, m, w = batch_size, c.data.max_neurons, c.data.window
  random = {
      'responses': lambda s: rng.poisson(1.0, s),
      'neurons': lambda s: np.stack([rng.choice(neurons, m, replace=False) for _ in range(b)]),
      'session': lambda s: rng.integers(0, sessions_, s),
      'animal': lambda s: rng.integers(0, animals, s),
      'frames': lambda s: rng.integers(0, 256, s),
      'times': lambda s: np.broadcast_to(np.arange(w) / c.data.rate, s),
      'trial': np.zeros, 'start': np.zeros,
  }
  batch = {}
  for name, spec in shapes.items():
    if spec.dtype == jnp.bool_:
      value = np.ones(spec.shape)       # every mask full
    elif name in random:
      value = random[name](spec.shape)
    else:
      value = rng.normal(size=spec.shape)
    batch[name] = np.ascontiguousarray(value).astype(spec.dtype)
  return batch
