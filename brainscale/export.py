"""A params-only checkpoint for inference: what a researcher opens, without the training state.

  python -m brainscale.export WORKDIR [--step=N] [--dtype=bfloat16] OUT

OUT becomes a workdir of one checkpoint (OUT/checkpoints/STEP): the params alone, in
`dtype`, stored in the inference layout (chunks are the `tensor` shards, so a load on
that mesh reads each stored byte once), and the resolved config, its inference.dtype
set to `dtype`. A CWM world model holds its frozen tokenizer as a submodule, so the
tokenizer travels in the params. inspect.load, launch/predict.py and the notebooks
open OUT as they open WORKDIR. Reads only the params of WORKDIR (never the optimizer
state); refuses an OUT that already holds a checkpoint.
"""

import argparse
import dataclasses
import pathlib
import sys
import time

import jax

from brainscale import inspect
from brainscale.config import ConfigError
from brainscale.train.checkpoint import CheckpointError, Checkpoints


@dataclasses.dataclass(frozen=True)
class Exported:
  """Where the export went and what it cost."""
  out: pathlib.Path
  step: int
  dtype: str
  bytes: int           # of the params, in `dtype`
  read_s: float        # opening WORKDIR's params (partial restore, cast, layout)
  write_s: float       # saving them into OUT

  def summary(self) -> str:
    return (f'exported step {self.step} to {self.out}: {self.bytes / 1e9:.3f} GB of {self.dtype} '
            f'params, read in {self.read_s:.1f} s, written in {self.write_s:.1f} s')


def export(workdir, out, *, step: int | None = None, dtype=None,
           mesh: jax.sharding.Mesh | None = None) -> Exported:
  """Writes the params of `workdir`'s checkpoint `step` (default the newest) to `out`."""
  out = pathlib.Path(out).expanduser().resolve()
  if inspect.steps(out):
    raise ConfigError(f'{out} already holds checkpoints (steps {inspect.steps(out)}); '
                      'expected a new or empty folder for the export')
  start = time.perf_counter()
  run = inspect.load(workdir, step, dtype=dtype, mesh=mesh)
  jax.block_until_ready(run.params)
  read_s = time.perf_counter() - start
  dtype = inspect.params_dtype(dtype or inspect.inference(run.config).dtype).name
  source = Checkpoints(str(run.workdir), keep=1_000_000, async_save=False)
  config = inspect.saved_config(source.config(run.step))
  source.close()
  with config.unlocked():
    config.inference = inspect.inference(config)   # an old run's config may lack it
    config.inference.dtype = dtype
  start = time.perf_counter()
  checkpoints = Checkpoints(str(out), keep=1, async_save=False)
  try:
    checkpoints.save(run.step, {'params': run.params}, None, config, force=True)
  finally:
    checkpoints.close()
  size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.params))
  return Exported(out, run.step, dtype, size, read_s, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m brainscale.export',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('workdir', metavar='WORKDIR', help='a run folder (launch/run.py --workdir)')
  parser.add_argument('out', metavar='OUT', help='folder to create: the params-only checkpoint')
  parser.add_argument('--step', type=int, default=None, help='default: the newest')
  parser.add_argument('--dtype', default=None,
                      help="the params' dtype (e.g. bfloat16); default the run's inference.dtype")
  args = parser.parse_args(argv)
  try:
    exported = export(args.workdir, args.out, step=args.step, dtype=args.dtype)
  except (ConfigError, CheckpointError, FileNotFoundError, OSError) as e:
    print(f'brainscale: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  print(f'brainscale: {exported.summary()}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
