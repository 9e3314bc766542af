"""Task seam of the Enigma family: windows of a neural store (data.py), a task mixture,
Poisson loss. The evaluation predicts held-out repeated trials from the stimulus and behaviour
and reports the Sensorium metrics next to a fitted LN baseline.
"""

import math
import os

import jax.numpy as jnp
from flax import nnx

from brainscale import config as config_lib
from brainscale import nn
from brainscale.data import neural
from brainscale.enigma import data, evaluation, masking
from brainscale.enigma.model import Enigma, Spec
from brainscale.train import task
from brainscale.train.prerequisites import Prerequisite

PAD_ROWS = 128  # embedding tables are padded so their rows shard over any mesh up to this


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
      self._store = data.open_store(self.config)
    return self._store

  def sessions(self) -> list[str]:
    """Sessions this run trains on: data.sessions, or all but the held-out ones."""
    return data.sessions(self.config, self.store)

  def train_data(self, process_index, process_count):
    c = self.config
    data.check_eval_tiers(c, self.store)   # the final evaluation needs them: fail now
    if process_index == 0:
      print(data.sessions_line(c, self.store), flush=True)
    return iter(data.pipeline(c, self.store, tiers=('train',), train=True, seed=c.seed,
                              batch_size=c.train.batch_size, process_index=process_index,
                              process_count=process_count))

  def eval_data(self, process_index, process_count):
    c = self.config
    it = iter(data.pipeline(c, self.store, tiers=tuple(c.data.eval_tiers), train=False,
                            seed=c.seed + 1, batch_size=c.train.batch_size,
                            process_index=process_index, process_count=process_count))
    return [next(it) for _ in range(c.train.eval_batches)]

  def batch_shapes(self, batch_size):
    return data.batch_shapes(self.config, batch_size)

  def synthetic_batch(self, batch_size, seed=0):
    tables = data.table_sizes(self.config, lambda: self.store)
    return data.synthetic_batch(self.config, tables, batch_size, seed)

  def tokens_per_example(self):
    return self._tokens()['tower']

  # ----------------------------------------------------------------- model
  def model(self, rngs):
    c = self.config
    neurons, sessions, animals = data.table_sizes(c, lambda: self.store)
    return Enigma(config_lib.typed(Spec, c.model), neurons=_padded(neurons),
                  sessions=_padded(sessions), animals=_padded(animals), window=c.data.window,
                  rate=c.data.rate, channels=len(neural.CHANNELS),
                  frame_shape=tuple(c.data.frame_shape), rngs=rngs)

  def prerequisites(self):
    """With adapt.experiment: its trained core, loaded and frozen (new-session adaptation);
    that run trains beside this one unless adapt.workdir names its folder."""
    a = self.config.adapt
    if not a.experiment:
      return {}
    base = config_lib.resolve(a.experiment, list(a.overrides))
    run_dir = os.path.abspath(a.workdir) if a.workdir else os.path.join('..', a.experiment)
    return {'core': Prerequisite(base, run_dir, subtree='core')}

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
