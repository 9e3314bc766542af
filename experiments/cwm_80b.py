# python launch/run.py --experiment=cwm_80b --config.data.directory=/data/videos_imported
"""The ~80B world model: 96 layers x 8192, 64 heads x 128, MLP 32,768, vocab 131,072.

Two 256x256 frames = 10,240 tokens. 24 nodes x 8 H100 = 192 devices laid out
as data 3 x fsdp 8 across nodes and fsdp 8 within a node (192 = 3 x 64 and every
model dimension is a power of two, so no axis may be 24): parameters and optimizer
state shard 64 ways and replicate 3 ways (hybrid sharded data parallel), one
sequence per GPU, no micro-batches, so each layer's weights are gathered twice a
step (forward, and backward with its recomputation), over 8 nodes whose 8 NICs
each carry an eighth. benchmarks/RESULTS.md compares this layout's GPU plan with
tensor parallelism within a node and with micro-batching.
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
  c.train.batch_size = 192           # one sequence per GPU; 1.97M tokens per step
  c.train.microbatches = 1
  c.train.learning_rate = 1.5e-4
  c.train.warmup_steps = 2000
  c.train.weight_decay = 0.1
  c.train.log_every = 10
  c.train.eval_every = 2000
  c.checkpoint.every_steps = 500
  c.data.workers = 8

  c.mesh.dcn = ml_collections.ConfigDict(dict(data=3, fsdp=8, sequence=1, tensor=1))
  c.mesh.ici = ml_collections.ConfigDict(dict(data=1, fsdp=8, sequence=1, tensor=1))
  # Opened for probes on one node: bf16 weights split 8 ways by heads/MLP/vocab (~20 GB
  # per GPU), KV cache split by heads (python launch/run.py --mode=probe_plan).
  c.inference.dtype = 'bfloat16'
  c.inference.tensor = 8
  c.cluster = base.cluster(nodes=24, time_limit='30-00:00:00')
  return c
