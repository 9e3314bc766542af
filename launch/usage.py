"""`--help` and `-h` of brainscale's command lines: a usage to act on, then the flags.

absl parses the flags; these options are answered before it sees them, on stdout,
with exit status 0 (absl's own `--helpfull` still lists every flag of every library).
"""

import sys

from absl import flags

from brainscale import config as config_lib

HELP = ('-h', '--help', '-?', '--helpshort')

MODES = {
    'train': 'train, or resume from the newest complete checkpoint in the workdir (default)',
    'eval': 'evaluate the newest checkpoint of the workdir',
    'describe': 'the config, a parameter table, FLOPs and memory per device; allocates nothing',
    'plan': "compile the train step for the cluster's GPUs (or simulated CPU devices): "
            'memory, speed, cost, fits',
    'goodput': "the run's wall time over all its restarts, productive and lost by cause, "
               'read from its events (no JAX)',
    'probe_plan': "compile a world model's KV-cached decode step and prefill for its inference "
                  'GPUs (make cuda): memory, examples that fit, ms per token',
}


def brainscale_usage() -> str:
  """What `brainscale --help` prints above the flags."""
  modes = '\n'.join(f'  {name:<9} {what}' for name, what in MODES.items())
  names = config_lib.experiment_summaries()
  width = max(map(len, names))
  experiments = '\n'.join(f'  {name:<{width}}  {line}' for name, line in names.items())
  return f"""\
brainscale: train, evaluate, describe or plan an experiment, or submit it to SLURM.

usage: brainscale --experiment=NAME [--mode=MODE] [--workdir=DIR] [--config.KEY=VALUE ...]
       brainscale --experiment=NAME --submit [--workdir=DIR] [--config.KEY=VALUE ...]
       (python launch/run.py takes the same flags)

modes (--mode):
{modes}

experiments (--experiment=NAME, the file experiments/NAME.py):
{experiments}

common flags:
  --workdir=DIR        checkpoints, logs, TensorBoard (default runs/NAME)
  --config.KEY=VALUE   set any key of the experiment's config, e.g. --config.train.steps=100;
                       `--mode=describe` prints them all; a mistyped key names the close ones
  --submit             write the sbatch script of the cluster section and submit it
                       (printed where there is no sbatch)
  --traceback          show the Python traceback of an expected failure too

examples:
  brainscale --experiment=smoke --config.train.steps=50 --workdir=/tmp/smoke
  brainscale --experiment=cwm_tiny --mode=eval
  brainscale --experiment=cwm_80b --mode=plan

exit status: 0 done; 1 non-finite loss, a plan that does not fit, or a bug; 2 bad input;
74 a checkpoint could not be written or read; 75 stopped by SIGTERM, checkpoint saved.
README.md says more."""


def answer_help(argv: list[str], text: str, flag_owner: str):
  """If argv asks for help: prints `text` and the flags that `flag_owner` (a flag's name)
  belongs to, then exits 0."""
  if not any(arg in HELP for arg in argv[1:]):
    return
  module = flags.FLAGS.find_module_defining_flag(flag_owner)
  print(text.strip() + '\n\nflags:\n' + flags.FLAGS.module_help(module) + '\n')
  sys.exit(0)
