# python launch/run.py --experiment=enigma_80m --config.data.root=STORE
"""Enigma at 80M shared parameters (768 x 12 layers, 12 heads), one 8-GPU node.

OmniMouse found neural prediction saturating near this size; the data is a
store made by brainscale/data/importers (Sensorium, NWB).
"""

from experiments import _enigma, base


def get_config():
  c = _enigma.enigma(dim=768, layers=12, heads=12, mlp_hidden=2048, global_every=6,
                     video_layers=2, decoder_layers=1, neuron_dim=256, max_neurons=1024,
                     table_rows=(262_144, 1024, 256))
  c.train.steps = 200_000
  c.train.batch_size = 256
  c.train.learning_rate = 6e-4
  c.train.warmup_steps = 2000
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.checkpoint.every_steps = 2000
  c.data.workers = 8
  c.cluster = base.cluster(nodes=1, time_limit='2-00:00:00')
  return c
