# python launch/run.py --experiment=smoke
"""A small causal transformer learns to reverse sequences; exercises the whole trainer."""

from experiments import base


def get_config():
  c = base.get_config()
  c.task = 'smoke'

  c.model.vocab = 32
  c.model.dim = 64
  c.model.layers = 2
  c.model.heads = 4
  c.model.kv_heads = 2
  c.model.head_dim = 16
  c.model.mlp = 'swiglu'
  c.model.mlp_hidden = 192
  c.model.qk_norm = True
  c.model.loss_chunk = 16
  c.model.remat = 'full'

  c.data.length = 8          # sequences of 2 * length + 1 tokens

  c.train.steps = 300
  c.train.batch_size = 32
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.01
  c.train.log_every = 25
  c.train.eval_batches = 2
  c.train.groups.no_decay = dict(pattern=r'(norm|scale)', lr_scale=1.0, weight_decay=0.0)

  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 3
  return c
