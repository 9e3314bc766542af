# python launch/run.py --experiment=enigma_tiny
"""A tiny Enigma on the simulated V1 population; trains on a 2-core CPU.

Generates the population on first use, trains on every session but one (kept
for `enigma_tiny_adapt`), and evaluates on the held-out repeated trials. On a store of
yours (--config.data.root=STORE) it trains on every session of it.
"""

from experiments import _enigma


def get_config():
  c = _enigma.enigma(dim=128, layers=2, heads=4, mlp_hidden=256, global_every=2,
                     video_layers=1, decoder_layers=1, neuron_dim=32, max_neurons=64)
  c.data.synthetic.holdout = ('a2s1',)   # the population's own; not a store's
  c.data.min_neurons = c.data.max_neurons   # all of a session's 64 neurons in every window
  c.loss.tasks = (4.0, 2.0, 2.0, 1.0)  # behaviour decoding has no neuron targets: drawn less
  c.model.latents_per_step = 2
  c.model.video_patch = (5, 9, 16)   # 4 x 4 tubelets per 5 frames
  c.model.decode_stride = 10
  c.model.compute_dtype = 'float32'  # XLA:CPU runs bf16 matmuls slower than fp32
  c.model.remat = 'none'
  c.train.steps = 1800   # still learning (benchmarks/RESULTS.md, "Enigma tiny on CPU")
  c.train.batch_size = 16
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.05
  c.train.log_every = 100
  c.train.eval_batches = 2
  c.checkpoint.every_steps = 900
  c.train.eval_every = 0   # scored once, at the end
  return c
