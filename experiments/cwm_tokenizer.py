# python launch/run.py --experiment=cwm_tokenizer --config.data.directory=/data/videos_imported
"""The 2^16-code local patch quantizer for 256x256 frames (cwm_1b, cwm_80b)."""

from experiments import _cwm, base


def get_config():
  c = base.get_config()
  c.task = 'cwm.TokenizerTask'
  c.model = _cwm.tokenizer_model(bits=16, channels=256, depth=3)
  _cwm.video_data(c, size=256, gap_ms=250.0,
                  train=_cwm.synthetic(count=4000, seed=0, size=256, fps=24.0),
                  held_out=_cwm.synthetic(count=64, seed=1, size=256, fps=24.0,
                                          speed=(6.0, 10.0)))
  c.data.workers = 8

  c.train.steps = 100_000
  c.train.batch_size = 256
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 1000
  c.train.weight_decay = 0.0
  c.train.log_every = 100
  c.checkpoint.every_steps = 2000

  c.cluster = base.cluster(nodes=1, time_limit='2-00:00:00')
  return c
