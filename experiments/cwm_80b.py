# python launch/run.py --experiment=cwm_80b --config.data.directory=/data/videos_imported
"""The ~80B world model: 96 layers x 8192, 64 heads x 128, MLP 32,768, vocab 131,072.

Two 256x256 frames = 10,240 tokens. 24 nodes x 8 H100 = 192 devices laid out
as data 3 x fsdp 8 across nodes and tensor 8 within a node (192 = 3 x 64 and
every model dimension is a power of two, so no axis may be 24): parameters and
optimizer state shard 64 ways and replicate 3 ways (hybrid sharded data parallel).
"""

import ml_collections

from experiments import _cwm, base


def get_config():
  c = base.get_config()
  _cwm.world_model(c, tokenizer='cwm_tokenizer', layers=96, dim=8192, heads=64,
                   vocab=131_072, loss_chunk=16_384)
  c.model.attention = 'cudnn'
  c.model.remat = 'full'

  c.train.steps = 250_000
  c.train.batch_size = 192           # 8 per data x fsdp shard; 1.97M tokens per step
  c.train.microbatches = 8           # 1 sequence per data shard at a time: activations ~18 GiB
  c.train.learning_rate = 1.5e-4
  c.train.warmup_steps = 2000
  c.train.weight_decay = 0.1
  c.train.log_every = 10
  c.train.eval_every = 2000
  c.checkpoint.every_steps = 500
  c.data.workers = 8

  c.mesh.dcn = ml_collections.ConfigDict(dict(data=3, fsdp=8, sequence=1, tensor=1))
  c.mesh.ici = ml_collections.ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=8))
  # Sequence parallelism: the residual stream between layers (what remat keeps, 96 x
  # 10240 x 8192 per sequence) is split 8 ways along its length. --mode=plan: 49.4 GiB
  # per device with it, 72.8 GiB without (budget 64).
  c.mesh.rules.act_length = 'tensor'
  c.cluster = base.cluster(nodes=24, time_limit='30-00:00:00')
  return c
