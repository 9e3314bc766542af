"""The one entry point: train, evaluate, describe or plan an experiment, or submit it.

  python launch/run.py --experiment=NAME [--workdir=DIR] [--mode=train|eval|describe|plan]
                       [--config.KEY=VALUE ...]
  python launch/run.py --experiment=NAME --submit [--workdir=DIR] [--config.KEY=VALUE ...]

--submit sbatches the experiment on its `cluster` section (launch/slurm.py).
Inside a multi-task srun step it calls jax.distributed.initialize() itself.
Exit status: 0 done; 1 a run that failed (non-finite loss, a plan that does not
fit); 2 bad input; 75 stopped by SIGTERM with a checkpoint saved (requeue me).
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags, logging  # noqa: E402

from brainscale import config as config_lib  # noqa: E402

flags.DEFINE_string('experiment', 'smoke', 'experiments/NAME.py to run')
flags.DEFINE_string('workdir', '', 'checkpoints and logs; default runs/NAME')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'describe', 'plan'], 'what to do')
flags.DEFINE_bool('submit', False, 'sbatch the experiment on its cluster section')
FLAGS = flags.FLAGS

_OVERRIDES: list[str] = []


def fail(message: str, code: int = 2):
  print(f'brainscale: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def submit(config):
  """--submit: writes and sbatches the job script; imports no JAX."""
  from launch import slurm  # noqa: PLC0415
  try:
    slurm.submit(config, workdir=FLAGS.workdir, overrides=_OVERRIDES)
  except config_lib.ConfigError as e:
    fail(str(e))
  except slurm.SubmitError as e:
    fail(str(e), code=1)


def plan(config):
  """--mode=plan: for the cluster's GPUs, or one simulated CPU device per GPU (set before
  JAX starts)."""
  import jax  # noqa: PLC0415
  from brainscale import plan as plan_lib  # noqa: PLC0415
  try:
    plan_lib.check(config)
    where = plan_lib.target(config)
  except config_lib.ConfigError as e:
    fail(str(e))
  jax.config.update('jax_platforms', 'cpu')   # a GPU target compiles here; nothing runs
  if where == 'cpu':
    jax.config.update('jax_num_cpu_devices', plan_lib.simulated_devices(config))
  try:
    text, fits = plan_lib.plan(config, where)
  except (ValueError, config_lib.ConfigError) as e:
    fail(str(e))
  print(text, flush=True)
  sys.exit(0 if fits else 1)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every file at INFO
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; options are --experiment, --workdir, --mode, '
         '--config.KEY=VALUE')
  try:
    config = config_lib.resolve(FLAGS.experiment, _OVERRIDES)
  except config_lib.ConfigError as e:
    fail(str(e))
  if FLAGS.submit:
    return submit(config)
  if FLAGS.mode == 'plan':
    return plan(config)
  from brainscale import parallel  # noqa: PLC0415  (after flags: Grain reads them)
  from brainscale.train import describe, loop, preemption  # noqa: PLC0415
  workdir = FLAGS.workdir or os.path.join('runs', FLAGS.experiment)
  try:
    if FLAGS.mode != 'describe':
      parallel.initialize_distributed(config.mesh)
    if FLAGS.mode == 'describe':
      print(describe.describe(config))
    elif FLAGS.mode == 'eval':
      loop.evaluate(config, workdir)
    else:
      loop.train(config, workdir)
  except config_lib.ConfigError as e:
    fail(str(e))
  except loop.NonFiniteError as e:
    fail(str(e), code=1)
  except preemption.Preempted as e:
    fail(str(e), code=preemption.REQUEUE_EXIT)
  except FileNotFoundError as e:
    fail(str(e))


if __name__ == '__main__':
  _OVERRIDES[:], rest = config_lib.split_overrides(sys.argv)
  app.run(main, argv=rest)
