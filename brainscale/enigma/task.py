"""Task seam of the Enigma family: windows of a neural store, a task mixture, Poisson loss.

`config.data.root` names a store made by an importer; empty means the embedded
default, a simulated V1 population generated once into $BRAINSCALE_DATA. The
evaluation predicts held-out repeated trials from the stimulus and behaviour
and reports the Sensorium metrics next to a fitted LN baseline.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from brainscale import config as config_lib
from brainscale import nn
from brainscale.data import cache, neural
from brainscale.data.synthetic import v1
from brainscale.enigma import evaluation, masking
from brainscale.enigma.model import Enigma
from brainscale.train import task

PAD_ROWS = 128  # embedding tables are padded so their rows shard over any mesh up to this


def store_root(c) -> str:
  """The store of config `c`: data.root, or the synthetic population (generated once)."""
  if c.data.root:
    return c.data.root
  spec = cache.spec_of(c.data.synthetic, v1.Spec)
  root = cache.named('enigma_synthetic', dataclasses.asdict(spec))

  def make():
    print(f'brainscale: simulating the V1 population into {root} (once)', flush=True)
    v1.generate(root, spec, overwrite=True)

  return str(cache.make_once(root, 'catalog.json', make))


def _padded(n: int) -> int:
  return max(PAD_ROWS, math.ceil(n / PAD_ROWS) * PAD_ROWS)


def _count(module: nnx.Module) -> int:
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


class Task(task.Task, task.Costs):
  """Enigma on windows of simultaneous neural activity, stimulus and behaviour."""

  def __init__(self, config):
    super().__init__(config)
    self._store = None

  # ------------------------------------------------------------------ data
  @property
  def store(self) -> neural.Store:
    if self._store is None:
      self._store = neural.Store(store_root(self.config))
      self._check_store(self._store)
    return self._store

  def _check_store(self, store):
    d = self.config.data
    if abs(store.rate - d.rate) > 1e-6 or tuple(store.frame_shape) != tuple(d.frame_shape):
      raise config_lib.ConfigError(
          f'store {store_root(self.config)} has rate {store.rate} Hz and frames '
          f'{tuple(store.frame_shape)}; this config expects data.rate={d.rate}, '
          f'data.frame_shape={tuple(d.frame_shape)}')

  def sessions(self) -> list[str]:
    """Sessions this run trains on: data.sessions, or all but data.holdout."""
    d, available = self.config.data, self.store.session_names
    missing = [s for s in d.holdout if s not in available]
    if missing:
      raise config_lib.ConfigError(
          f'data.holdout={tuple(d.holdout)}: {", ".join(map(repr, missing))} is not a session '
          f'of the store {self.store.root}; its sessions are {available} (data.holdout=() '
          'holds none out)')
    names = list(d.sessions) or [s for s in available if s not in d.holdout]
    unknown = sorted(set(names) - set(available))
    if unknown:
      raise config_lib.ConfigError(f'data.sessions {unknown} not in the store; it has '
                                   f'{available}')
    if not names:
      raise config_lib.ConfigError(
          f'data.sessions={tuple(d.sessions)} and data.holdout={tuple(d.holdout)} leave no '
          f'session to train on; the store {self.store.root} has {available}')
    return names

  def _check_eval_tiers(self):
    """Raises at start-up unless data.eval_tiers holds a window in the sessions trained on."""
    d, sessions = self.config.data, self.sessions()
    index = neural.windows(self.store, tiers=tuple(d.eval_tiers), window=d.window,
                           stride=d.stride, sessions=sessions)
    if not len(index):
      tiers = neural.tier_counts(self.store, sessions)
      raise config_lib.ConfigError(
          f'data.eval_tiers={tuple(d.eval_tiers)}: no window of {d.window} samples fits inside '
          f'a trial of these tiers in sessions {sessions} of {self.store.root} (their trials: '
          f'{tiers}); import the data with held-out trials, or set data.eval_tiers to tiers it has')

  def _pipeline(self, *, tiers, train, seed, batch_size, process_index, process_count):
    d = self.config.data
    return neural.pipeline(
        self.store.root, seed=seed,
        batch_size=batch_size, process_index=process_index, process_count=process_count,
        window=d.window, stride=d.stride, tiers=tuple(tiers), max_neurons=d.max_neurons,
        min_neurons=d.min_neurons, train=train, workers=d.workers if train else 0,
        prefetch=d.prefetch, sessions=self.sessions())

  def train_data(self, process_index, process_count):
    c = self.config
    self._check_eval_tiers()   # the final evaluation needs them: fail now, not after training
    return iter(self._pipeline(tiers=('train',), train=True, seed=c.seed,
                               batch_size=c.train.batch_size, process_index=process_index,
                               process_count=process_count))

  def eval_data(self, process_index, process_count):
    c = self.config
    it = iter(self._pipeline(tiers=tuple(c.data.eval_tiers), train=False, seed=c.seed + 1,
                             batch_size=c.train.batch_size, process_index=process_index,
                             process_count=process_count))
    return [next(it) for _ in range(c.train.eval_batches)]

  def batch_shapes(self, batch_size):
    d, f32, i32 = self.config.data, jnp.float32, jnp.int32
    w, m, ch = d.window, d.max_neurons, len(neural.CHANNELS)
    shape = lambda dims, dtype: jax.ShapeDtypeStruct((batch_size,) + dims, dtype)
    return {'responses': shape((w, m), f32), 'responses_mask': shape((w, m), jnp.bool_),
            'neurons': shape((m,), i32), 'neuron_mask': shape((m,), jnp.bool_),
            'positions': shape((m, 3), f32), 'session': shape((), i32), 'animal': shape((), i32),
            'frames': shape((w,) + tuple(d.frame_shape), jnp.uint8),
            'frames_mask': shape((w,), jnp.bool_), 'behavior': shape((w, ch), f32),
            'behavior_mask': shape((w, ch), jnp.bool_), 'times': shape((w,), f32),
            'trial': shape((), i32), 'start': shape((), i32)}

  def synthetic_batch(self, batch_size, seed=0):
    """Full windows of every modality; neurons, sessions and animals drawn from the tables."""
    c, rng = self.config, np.random.default_rng(seed)
    w, m, ch = c.data.window, c.data.max_neurons, len(neural.CHANNELS)
    neurons = c.model.neurons or self.store.num_neurons
    sessions = c.model.sessions or len(self.store.session_names)
    animals = c.model.animals or len(self.store.animals)
    b = batch_size
    ones = lambda *dims: np.ones((b,) + dims, np.bool_)
    return {'responses': rng.poisson(1.0, (b, w, m)).astype(np.float32),
            'responses_mask': ones(w, m),
            'neurons': np.stack([rng.choice(neurons, m, replace=False) for _ in range(b)]
                                ).astype(np.int32),
            'neuron_mask': ones(m), 'positions': rng.normal(size=(b, m, 3)).astype(np.float32),
            'session': rng.integers(0, sessions, b, dtype=np.int32),
            'animal': rng.integers(0, animals, b, dtype=np.int32),
            'frames': rng.integers(0, 256, (b, w) + tuple(c.data.frame_shape), dtype=np.uint8),
            'frames_mask': ones(w), 'behavior': rng.normal(size=(b, w, ch)).astype(np.float32),
            'behavior_mask': ones(w, ch),
            'times': np.broadcast_to(np.arange(w, dtype=np.float32) / c.data.rate, (b, w)).copy(),
            'trial': np.zeros(b, np.int32), 'start': np.zeros(b, np.int32)}

  def tokens_per_example(self):
    return self._tokens()['tower']

  # ----------------------------------------------------------------- model
  def model(self, rngs):
    c = self.config
    m = c.model
    neurons, sessions, animals = m.neurons, m.sessions, m.animals
    if not (neurons and sessions and animals):
      s = self.store
      neurons, sessions, animals = s.num_neurons, len(s.session_names), len(s.animals)
    return Enigma(m, neurons=_padded(neurons), sessions=_padded(sessions),
                  animals=_padded(animals), window=c.data.window, rate=c.data.rate,
                  channels=len(neural.CHANNELS),
                  frame_shape=tuple(c.data.frame_shape), rngs=rngs)

  def prerequisites(self, workdir):
    """With adapt.experiment: its trained core, loaded and frozen (new-session adaptation)."""
    a = self.config.adapt
    if not a.experiment:
      return {}
    base = config_lib.resolve(a.experiment, list(a.overrides))
    return {'core': (base, a.workdir or os.path.join(os.path.dirname(workdir), a.experiment),
                     'core')}

  def loss(self, model, batch, rng, train):
    c = self.config
    masks = masking.sample(batch, rng, tuple(c.loss.tasks))
    rates_BxWxM, behavior_BxWxC = model(batch, masks)
    nll = nn.poisson_nll(rates_BxWxM, batch['responses'], masks.neuron_target_BxWxM)
    mse = nn.masked_mse(behavior_BxWxC, batch['behavior'], masks.behavior_target_BxWxC)
    loss = nll + c.loss.behavior_weight * mse
    metrics = {'loss': loss, 'poisson_nll': nll, 'behavior_mse': mse}
    for i, name in enumerate(masking.TASKS[:3]):   # NaN when no example drew the task
      target = masks.neuron_target_BxWxM & (masks.task_B == i)[:, None, None]
      metrics[f'nll_{name}'] = nn.poisson_nll(rates_BxWxM, batch['responses'], target,
                                              empty=jnp.nan)
    return loss, metrics

  def evaluate(self, model):
    c = self.config
    if not c.evaluation.sessions:
      return {}
    return evaluation.evaluate(model, self.store, self.sessions()[:c.evaluation.sessions], c)

  # ------------------------------------------------------------ accounting
  def _tokens(self) -> dict:
    c, m = self.config, self.config.model
    w = c.data.window
    neuron = c.data.max_neurons * ((w - m.neuron_kernel) // m.neuron_stride + 1)
    gh, gw = (c.data.frame_shape[0] // m.video_patch[1], c.data.frame_shape[1] // m.video_patch[2])
    video = (w // m.video_patch[0]) * gh * gw
    latents = (w // m.latent_stride) * m.latents_per_step
    queries = (c.data.max_neurons + len(neural.CHANNELS)) * (w // m.decode_stride)
    return dict(neuron=neuron, video=video, latents=latents,
                tower=latents + video + len(neural.CHANNELS), queries=queries,
                neuron_bins=c.data.max_neurons * (w // m.decode_stride))

  def flops_per_example(self) -> float:
    """6 x weights x tokens for each part, plus attention (QK and PV, fwd + bwd)."""
    m = self.config.model
    core = nnx.eval_shape(lambda: self.model(nnx.Rngs(0))).core
    t = self._tokens()
    inner = m.heads * m.head_dim
    kv_weights = 2 * m.dim * inner
    matmuls = (_count(core.video) * t['video'] + _count(core.tower) * t['tower'] +
               (_count(core.read) - kv_weights) * t['latents'] + kv_weights * t['neuron'] +
               (_count(core.decoder) - m.decoder_layers * kv_weights) * t['queries'] +
               m.decoder_layers * kv_weights * t['tower'] +
               _count(core.neuron_tokens) * t['neuron'] + _count(core.video_tokens) * t['video'] +
               core.w_readout_KxDxD.size * t['neuron_bins'])
    window = min(2 * m.local_window * self.config.data.rate / m.video_patch[0], 1.0)
    tower_pairs = t['tower'] ** 2 * (1 + (m.global_every - 1) * window) / m.global_every
    attention = 4 * inner * (m.video_layers * t['video'] ** 2 + t['latents'] * t['neuron'] +
                             m.layers * tower_pairs + m.decoder_layers * t['queries'] * t['tower'])
    gaussian_readout = 2 * self.config.data.max_neurons * t['video'] * m.dim   # mask @ grid
    return 6 * matmuls + 3 * attention + 3 * gaussian_readout

  def activation_bytes(self, examples_per_device: int) -> int:
    m, t = self.config.model, self._tokens()
    dense = m.attention == 'xla'
    tower = nn.stack_activation_bytes(
        layers=m.layers, tokens=examples_per_device * t['tower'], dim=m.dim,
        mlp_hidden=m.mlp_hidden, heads=m.heads, seq=t['tower'], remat=m.remat,
        dense_scores=dense)
    decoder = nn.stack_activation_bytes(
        layers=m.decoder_layers, tokens=examples_per_device * t['queries'], dim=m.dim,
        mlp_hidden=m.mlp_hidden, heads=m.heads, seq=t['queries'], remat=m.remat,
        dense_scores=False)
    return tower + decoder

  def describe_lines(self, rows) -> list[str]:
    """core_params (shared) apart from the per-neuron/session/animal tables."""
    core = sum(r.count for r in rows if r.path.startswith('core/'))
    per_neuron = sum(r.count for r in rows if r.path.startswith('neuron_'))
    other = sum(r.count for r in rows) - core - per_neuron
    return [f'core_params: {core}', f'per_neuron_params: {per_neuron}  '
            f'({self.config.model.neuron_dim} per neuron)', f'session_params: {other}']
