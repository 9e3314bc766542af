# python benchmarks/mfu.py --experiment=cwm_1b_1gpu
"""cwm_1b's full model (36 x 1280, 256x256 pairs) on one H100/H200.

What benchmarks/mfu.py measures. benchmarks/RESULTS.md has its memory plan against
other remat/batch/attention choices, and the GPU measurements still to make.
Depth is not reduced: params and Adam state take 9.9 GiB.
"""

import ml_collections

from experiments import base, cwm_1b


def get_config():
  c = cwm_1b.get_config()
  c.train.batch_size = 8             # cwm_1b's share per GPU: 82k tokens per step
  c.mesh.ici = ml_collections.ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=1))
  c.cluster = base.cluster(nodes=1, gpus_per_node=1, time_limit='1-00:00:00')
  return c
