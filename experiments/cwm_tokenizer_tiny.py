# python launch/run.py --experiment=cwm_tokenizer_tiny
"""The local patch quantizer of cwm_tiny on synthetic 48x48 physics clips (CPU, minutes).

2^10 codes rather than the 2^16 of the large tokenizer (cwm_tokenizer): the
tiny world model's output head and loss scale with the codebook.
"""

from experiments import _cwm, base


def get_config():
  c = base.get_config()
  c.task = 'cwm.TokenizerTask'
  c.model = _cwm.tokenizer_model(bits=10, channels=96, depth=2)
  _cwm.video_data(c, size=48, gap_ms=167.0,
                  train=_cwm.synthetic(count=400, seed=0, size=48, speed=(1.5, 4.0),
                                       object_size=(0.2, 0.4)),
                  held_out=_cwm.synthetic(count=32, seed=1, size=48, speed=(2.5, 4.0),
                                          object_size=(0.2, 0.4), camera=0.5))

  c.model.compute_dtype = 'float32'  # XLA:CPU runs bf16 matmuls slower than fp32
  c.train.steps = 800
  c.train.batch_size = 32
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.train.log_every = 100
  c.train.eval_batches = 2
  c.checkpoint.every_steps = 400
  return c
