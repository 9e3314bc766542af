"""The one entry point: train, evaluate or describe an experiment.

  python launch/run.py --experiment=NAME [--workdir=DIR] [--mode=train|eval|describe]
                       [--config.KEY=VALUE ...]

Inside a multi-task srun step it calls jax.distributed.initialize() itself.
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags, logging  # noqa: E402

from brainscale import config as config_lib  # noqa: E402

flags.DEFINE_string('experiment', 'smoke', 'experiments/NAME.py to run')
flags.DEFINE_string('workdir', '', 'checkpoints and logs; default runs/NAME')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'describe'], 'what to do')
FLAGS = flags.FLAGS

_OVERRIDES: list[str] = []


def fail(message: str, code: int = 2):
  print(f'brainscale: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every file at INFO
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; options are --experiment, --workdir, --mode, '
         '--config.KEY=VALUE')
  try:
    config = config_lib.resolve(FLAGS.experiment, _OVERRIDES)
  except config_lib.ConfigError as e:
    fail(str(e))
  from brainscale import parallel  # noqa: PLC0415  (after flags: Grain reads them)
  from brainscale.train import describe, loop  # noqa: PLC0415
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
  except FileNotFoundError as e:
    fail(str(e))


if __name__ == '__main__':
  _OVERRIDES[:], rest = config_lib.split_overrides(sys.argv)
  app.run(main, argv=rest)
