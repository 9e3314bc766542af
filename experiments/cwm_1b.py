# python launch/run.py --experiment=cwm_1b --config.data.directory=/data/videos_imported
"""A ~1B world model (LRAS 1B: 36 layers x 1280, 20 heads), 256x256 pairs, one 8-GPU node."""

import ml_collections

from experiments import _cwm, base


def get_config():
  c = base.get_config()
  # 2^16 codes + 2 x 1024 pointers = 67,584 tokens (a multiple of 128)
  _cwm.world_model(c, tokenizer='cwm_tokenizer', layers=36, dim=1280, heads=20,
                   vocab=67_584, loss_chunk=8448)
  c.model.attention = 'cudnn'
  c.model.remat = 'full'

  c.train.steps = 200_000
  c.train.batch_size = 64            # 655k tokens per step
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.train.weight_decay = 0.1
  c.train.log_every = 50
  c.train.eval_every = 5000
  c.checkpoint.every_steps = 1000

  c.mesh.ici = ml_collections.ConfigDict(dict(data=1, fsdp=8, sequence=1, tensor=1))
  c.inference.dtype = 'bfloat16'    # one GPU holds a copy: data over the local GPUs
  c.cluster = base.cluster(nodes=1, time_limit='7-00:00:00')
  return c
