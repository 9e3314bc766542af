# python benchmarks/mfu.py --experiment=enigma_1b_1gpu
"""enigma_1b's full model (30 x 1536, 5 local : 1 global, 2^21 neuron rows) on one H100/H200.

What benchmarks/mfu.py measures. benchmarks/RESULTS.md has its memory plan against
other remat/batch/attention choices, and the GPU measurements still to make.
Depth is not reduced: params and Adam state take 17.2 GiB.
"""

import ml_collections

from experiments import base, enigma_1b


def get_config():
  c = enigma_1b.get_config()
  c.train.batch_size = 8             # enigma_1b's share per GPU
  c.mesh.dcn.data = 1
  c.mesh.ici = ml_collections.ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=1))
  c.cluster = base.cluster(nodes=1, gpus_per_node=1, time_limit='1-00:00:00')
  return c
