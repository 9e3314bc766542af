# python benchmarks/plans.py --experiment=cwm_1b_1gpu --candidates=";model.remat=dots"
"""Plan candidates of an experiment side by side, compiled for its cluster's GPUs.

Each candidate is a set of `--config` overrides (KEY=VALUE, comma-separated; candidates
separated by ';'; the empty candidate is the committed config). Each is compiled as
`--mode=plan` does (XLA's GPU compiler on this CPU, CUDA plugin needed) and is one row:
XLA GPU's memory per device, whether it fits, compiled / model FLOPs, the roofline
compute time, the collectives' time and bytes per link, and the predicted step time and
MFU (an estimate: collectives hidden .. not hidden). Pick by memory and predicted MFU.
"""

import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')   # compiles for a GPU topology; needs none

from absl import app, flags

from brainscale import config as config_lib
from brainscale.plan import gpu, plan

flags.DEFINE_string('experiment', 'cwm_1b_1gpu', 'an experiment with a cluster section')
flags.DEFINE_string('candidates', '', "';'-separated sets of comma-separated KEY=VALUE")
FLAGS = flags.FLAGS


def candidates(text: str) -> list[list[str]]:
  """'a=1,b=2;c=3' -> [['--config.a=1', '--config.b=2'], ['--config.c=3']]."""
  return [[f'--config.{kv.strip()}' for kv in group.split(',') if kv.strip()]
          for group in text.split(';')]


def row(experiment: str, overrides: list[str]) -> dict:
  config = config_lib.resolve(experiment, overrides)
  plan.check(config)
  start = time.perf_counter()
  p = plan.compile_step(config, 'gpu')
  est = plan.estimate(config, p)
  links = {'NVLink': 0.0, 'InfiniBand': 0.0}
  for (_, _, link), b in p.analysis.collective_bytes().items():
    links[link] += b
  budget = config.plan.hbm_fraction * gpu.spec(config.cluster.gpu).hbm_gib
  return dict(candidate=' '.join(o.removeprefix('--config.') for o in overrides) or 'committed',
              gib=p.per_device_gib, fits=p.per_device_gib <= budget,
              ratio=p.compiled_flops / p.model_flops, compute_s=est.compute_s,
              collective_s=est.collective_s, step_s=est.step_s, mfu=est.mfu,
              nvlink_gb=links['NVLink'] / 1e9, infiniband_gb=links['InfiniBand'] / 1e9,
              wall_s=time.perf_counter() - start)


def main(argv):
  del argv
  config = config_lib.resolve(FLAGS.experiment, [])
  print(f'# {FLAGS.experiment}: {config.cluster.nodes} x {config.cluster.gpus_per_node} '
        f'{config.cluster.gpu}, budget {config.plan.hbm_fraction} x HBM; estimates')
  print('| candidate | GiB/device | fits | compiled/model | compute s | collectives s | '
        'step s (hidden .. not) | MFU (not .. hidden) | NVLink GB | IB GB |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for overrides in candidates(FLAGS.candidates):
    try:
      r = row(FLAGS.experiment, overrides)
    except Exception as e:  # a candidate that does not compile is a row, not the end
      print(f'| {" ".join(overrides)} | failed: {type(e).__name__}: {str(e)[:150]} |')
      continue
    print(f"| {r['candidate']} | {r['gib']:.1f} | {'yes' if r['fits'] else 'no'} | "
          f"{r['ratio']:.2f} | {r['compute_s']:.3f} | {r['collective_s']:.3f} | "
          f"{r['step_s'][0]:.3f} .. {r['step_s'][1]:.3f} | "
          f"{r['mfu'][0]:.3f} .. {r['mfu'][1]:.3f} | "
          f"{r['nvlink_gb']:.1f} | {r['infiniband_gb']:.1f} |", flush=True)


if __name__ == '__main__':
  app.run(main)
