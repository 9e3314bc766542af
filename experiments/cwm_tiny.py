# python launch/run.py --experiment=cwm_tiny
"""A tiny world model on synthetic 64x64 physics clips; trains on a 2-core CPU.

Trains its tokenizer (cwm_tokenizer_tiny) first if needed, freezes it, then
learns to predict frame 1 from frame 0 over 640-token pointer sequences.
"""

from experiments import _cwm, base


def get_config():
  c = base.get_config()
  # 2^10 codes + 2 x 64 pointers = 1152 tokens
  _cwm.world_model(c, tokenizer='cwm_tokenizer_tiny', layers=4, dim=128, heads=4,
                   vocab=1152, loss_chunk=1152)

  c.train.steps = 800
  c.train.batch_size = 16
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.05
  c.train.log_every = 50
  c.train.eval_batches = 2
  c.checkpoint.every_steps = 200
  return c
