"""Pieces the Enigma experiments share (a helper module, not an experiment)."""

import dataclasses

import ml_collections

from brainscale.data.synthetic import v1
from experiments import base


def synthetic(**overrides) -> ml_collections.ConfigDict:
  """A simulated V1 population (brainscale/data/synthetic/v1.py:Spec); defaults + overrides.
  `holdout` names sessions of it kept out of training; it applies to this population only,
  never to a store given by data.root."""
  return ml_collections.ConfigDict({**dataclasses.asdict(v1.Spec()), 'holdout': (),
                                    **overrides})


def enigma(*, dim: int, layers: int, heads: int, mlp_hidden: int, global_every: int,
           video_layers: int, decoder_layers: int, neuron_dim: int, max_neurons: int,
           table_rows: tuple[int, int, int] = (0, 0, 0)) -> ml_collections.ConfigDict:
  """An Enigma config on 2 s windows at 30 Hz of 36x64 stimulus frames.

  table_rows = (neurons, sessions, animals) sizes the embedding tables; zeros
  read them from the data's catalog (small stores only: describe then opens it).
  """
  c = base.get_config()
  c.task = 'enigma'
  m = c.model
  m.dim = dim
  m.layers = layers
  m.heads = heads
  m.head_dim = dim // heads
  m.mlp_hidden = mlp_hidden          # SwiGLU hidden width
  m.qk_norm = True
  m.global_every = global_every      # every k-th tower layer attends globally, the rest locally
  m.local_window = 0.5               # seconds either side, for the local layers
  m.rope_base = 1000.0               # rotary on time in samples (1/30 s)
  m.neuron_dim = neuron_dim          # per-neuron embedding width (per-neuron parameters)
  m.neuron_kernel = 10               # strided conv over each neuron's trace
  m.neuron_stride = 5
  m.video_patch = (5, 9, 8)          # tubelet: frames x pixels x pixels
  m.video_layers = video_layers
  m.latents_per_step = 4             # latents per latent time step
  m.latent_stride = 5                # samples between latent time steps
  m.decoder_layers = decoder_layers
  m.decode_stride = 5                # one query per neuron per 5 samples
  m.readout_seconds = 0.3            # stimulus history each neuron's query reads (its RF's span)
  m.softplus_beta = 1.0              # rates = softplus(beta x) / beta (responses in std units)
  m.neurons, m.sessions, m.animals = table_rows

  d = c.data
  d.root = ''                        # a store (importers/, synthetic/v1.py); '' = synthetic
  d.synthetic = synthetic()
  d.sessions = ()                    # sessions to train on; () = all but holdout
  d.holdout = ()                     # sessions of the store kept out (e.g. for adaptation)
  d.eval_tiers = ('validation', 'test')  # eval-loss windows (Sensorium imports have no
                                         # validation tier; its test trials serve)
  d.rate = 30.0                      # Hz; the store must match
  d.frame_shape = (36, 64)
  d.window = 60                      # samples per window (2 s)
  d.stride = 15                      # between training windows of a trial
  d.max_neurons = max_neurons        # neurons per window (padded)
  d.min_neurons = max_neurons // 2

  c.loss = ml_collections.ConfigDict()
  c.loss.tasks = (1.0, 1.0, 1.0, 1.0)   # encoding, cosmoothing, forecasting, behavior
  c.loss.behavior_weight = 0.1

  c.evaluation = ml_collections.ConfigDict()
  c.evaluation.sessions = 4          # sessions whose repeated trials are scored (0: none)
  c.evaluation.batch = 32            # windows per forward pass
  c.evaluation.skip = 50             # frames skipped at each trial start (Sensorium)
  c.evaluation.ln_lags = 8           # LN baseline: frames of stimulus history
  c.evaluation.ln_pool = 4           # LN baseline: frames average-pooled by this

  c.adapt = ml_collections.ConfigDict()
  c.adapt.experiment = ''            # a trained run whose core is loaded and frozen
  c.adapt.workdir = ''               # '' = runs/<adapt.experiment> beside this run
  c.adapt.overrides = ()

  c.train.groups.no_decay = dict(pattern=r'norm', lr_scale=1.0, weight_decay=0.0)
  # each neuron is in a few windows of a batch: its embedding moves faster than shared weights
  c.train.groups.tables = dict(pattern=r'^(neuron_NxE|session_SxD|animal_AxD)',
                               lr_scale=10.0, weight_decay=0.0)
  c.mesh.rules.neurons = 'fsdp'
  return c


def adapt(c, base_experiment: str, sessions: tuple[str, ...]):
  """Fit only the neuron/session/animal tables of `sessions` on `base_experiment`'s frozen core."""
  c.adapt.experiment = base_experiment
  c.data.sessions = sessions
  c.data.holdout = c.data.synthetic.holdout = ()
