# python launch/run.py --experiment=enigma_1b --config.data.root=STORE --submit
"""Enigma at ~1B shared parameters: 1536 x 30 layers (5 local : 1 global), 24 heads x 64.

Per-neuron embeddings (256 per neuron, up to 2^21 neurons) are counted apart
by describe. 8 nodes x 8 H100: data parallel across nodes, FSDP within. Attention
runs the Pallas flash kernels, which skip the blocks outside the local layers' time
windows and the padded keys; each layer keeps its projections for the backward
(remat 'dots'). benchmarks/RESULTS.md has the GPU plans these were chosen by.
"""

from experiments import _enigma, base


def get_config():
  c = _enigma.enigma(dim=1536, layers=30, heads=24, mlp_hidden=4096, global_every=6,
                     video_layers=2, decoder_layers=2, neuron_dim=256, max_neurons=1024,
                     table_rows=(2_097_152, 4096, 1024))
  c.train.steps = 300_000
  c.model.attention = 'pallas'
  c.model.remat = 'dots'
  c.train.batch_size = 512           # 8 windows per GPU
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 3000
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.checkpoint.every_steps = 1000
  c.data.workers = 8
  c.mesh.dcn.data = 8
  c.mesh.ici.fsdp = 8
  c.inference.dtype = 'bfloat16'    # one GPU (or a CPU) holds a copy
  c.cluster = base.cluster(nodes=8, time_limit='7-00:00:00')
  return c
