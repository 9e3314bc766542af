# python launch/run.py --experiment=cwm_tiny
"""A tiny world model on synthetic 48x48 physics clips; trains on a 2-core CPU.

Trains its tokenizer (cwm_tokenizer_tiny) first if needed, freezes it, then
learns to predict frame 1 from frame 0 over 360-token pointer sequences.
"""

from experiments import _cwm, base


def get_config():
  c = base.get_config()
  # 2^10 codes + 2 x 36 pointers = 1096 tokens, padded to 1152
  _cwm.world_model(c, tokenizer='cwm_tokenizer_tiny', layers=4, dim=128, heads=4,
                   vocab=1152, loss_chunk=1152)

  c.model.compute_dtype = 'float32'  # XLA:CPU runs bf16 matmuls slower than fp32
  c.model.remat = 'none'             # activations fit; recomputing would slow the step
  c.train.steps = 2200               # batch 8: twice the updates of batch 16 in the same
  c.train.batch_size = 8             # time, for a lower eval NLL (benchmarks/RESULTS.md)
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.05
  c.train.log_every = 100
  c.train.eval_batches = 2
  c.checkpoint.every_steps = 550
  return c
