"""The one entry point: train, evaluate, describe or plan an experiment, or submit it.

  python launch/run.py --experiment=NAME [--workdir=DIR]
                       [--mode=train|eval|describe|plan|goodput|probe_plan] [--config.KEY=VALUE ...]
  python launch/run.py --experiment=NAME --submit [--workdir=DIR] [--config.KEY=VALUE ...]

`brainscale` (the command `pip install -e .` installs) is the same program: `entry`.
--mode=probe_plan compiles a world model's decode step and prefill for its inference
GPUs (brainscale/plan/probe_plan.py). --submit sbatches the experiment on its `cluster`
section (launch/slurm.py).
Inside a multi-task srun step it calls jax.distributed.initialize() itself.
Every expected failure (a bad config value or workdir, a missing or corrupt input
file, a checkpoint that cannot be written) is one line on stderr, `brainscale: ...`,
naming the key or file; --traceback shows the Python traceback as well. Anything
else is a bug and keeps its traceback.

Exit status: 0 done; 1 a run that failed (non-finite loss, a plan or a probe plan that
does not fit) or a bug; 2 bad input; 69 a peer process or the network was lost (a JAX
runtime error of a multi-process run); 74 a checkpoint could not be written, or none of
the checkpoints present can be read; 75 stopped by SIGTERM with a checkpoint saved
(requeue me); 124 the hang watchdog fired (train/watchdog.py). README's table says
what the sbatch script does on each (launch/campaign.py).
"""

import os
import sys

from absl import app, flags

from brainscale import config as config_lib
from launch import errors
from launch import usage as usage_lib
from launch.errors import fail

flags.DEFINE_string('experiment', 'smoke', 'experiments/NAME.py to run')
flags.DEFINE_string('workdir', '', 'checkpoints and logs; default runs/NAME')
flags.DEFINE_enum('mode', 'train', list(usage_lib.MODES), 'what to do')
flags.DEFINE_bool('submit', False, 'sbatch the experiment on its cluster section')
flags.DEFINE_bool('traceback', False, 'show the Python traceback of an expected failure too')
FLAGS = flags.FLAGS

_OVERRIDES: list[str] = []



def cluster_size(config) -> dict:
  """validate()'s sizes for the experiment's cluster section (plan and submit)."""
  from launch import slurm  # noqa: PLC0415  (each mode imports what it needs: --submit no JAX)
  cluster = config.cluster
  return dict(num_devices=config_lib.cluster_devices(cluster), num_nodes=cluster.nodes,
              num_processes=cluster.nodes * slurm.tasks_per_node(cluster))


def submit(config):
  """--submit: writes and sbatches the job script; imports no JAX."""
  from launch import slurm  # noqa: PLC0415
  try:
    if 'cluster' in config:
      config_lib.validate(config, **cluster_size(config))
    slurm.submit(config, workdir=FLAGS.workdir, overrides=_OVERRIDES)
  except config_lib.ConfigError as e:
    fail(str(e))
  except slurm.SubmitError as e:
    fail(str(e), code=1)


def plan(config):
  """--mode=plan: for the cluster's GPUs, or one simulated CPU device per GPU (set before
  JAX starts)."""
  import jax  # noqa: PLC0415  (JAX after the mode is known: --submit imports none)

  from brainscale.plan import plan as plan_lib  # noqa: PLC0415
  try:
    plan_lib.check(config)
    config_lib.validate(config, **cluster_size(config))
    where = plan_lib.target(config)
  except config_lib.ConfigError as e:
    fail(str(e))
  jax.config.update('jax_platforms', 'cpu')   # a GPU target compiles here; nothing runs
  # No persistent compilation cache ($JAX_COMPILATION_CACHE_DIR): compile_s is the compile
  # itself, and JAX cannot load back a compile for a GPU topology (it warns, then compiles).
  jax.config.update('jax_enable_compilation_cache', False)
  if where == 'cpu':
    devices = plan_lib.simulated_devices(config)
    jax.config.update('jax_num_cpu_devices', devices)
    os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''),
                                        *plan_lib.CPU_XLA_FLAGS]).strip()
    print(f'plan: compiling for {devices} simulated CPU devices, one per GPU: '
          f'{plan_lib.cpu_reason(config)}', flush=True)
  try:
    text, fits = plan_lib.plan(config, where)
  except (ValueError, config_lib.ConfigError) as e:
    fail(str(e))
  print(text, flush=True)
  sys.exit(0 if fits else 1)


def probe_plan(config):
  """--mode=probe_plan: the probes of a world model compiled for its inference GPUs."""
  import jax  # noqa: PLC0415  (JAX after the mode is known: --submit imports none)

  from brainscale.plan import probe_plan as probe_plan_lib  # noqa: PLC0415
  jax.config.update('jax_platforms', 'cpu')   # a GPU target compiles here; nothing runs
  jax.config.update('jax_enable_compilation_cache', False)   # as in plan()
  with errors.funnel(FLAGS.traceback):
    planned = probe_plan_lib.probe_plan(config)
  print(planned.report(), flush=True)
  sys.exit(0 if planned.fits() else 1)


def run(config, workdir: str):
  """train, eval or describe on this job's devices."""
  import jax  # noqa: PLC0415  (JAX after the mode is known: --submit imports none)

  from brainscale import parallel  # noqa: PLC0415  (after flags: Grain reads them)
  from brainscale.train import describe, loop  # noqa: PLC0415
  if FLAGS.mode == 'describe':   # describes the cluster's run where there is one
    size = cluster_size(config) if 'cluster' in config else {'num_devices': jax.device_count()}
    config_lib.validate(config, **size)
    print(describe.describe(config))
    return
  parallel.initialize_distributed(config.mesh)
  config_lib.validate(config, num_devices=jax.device_count(), num_nodes=parallel.num_nodes(),
                      num_processes=jax.process_count())
  config_lib.check_workdir(workdir, write=FLAGS.mode == 'train')
  if FLAGS.mode == 'eval':
    loop.evaluate(config, workdir)
  else:
    loop.train(config, workdir)


def main(argv):
  errors.quiet_logs(FLAGS.traceback)
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; options are --experiment, --workdir, --mode, '
         '--config.KEY=VALUE, --submit, --traceback')
  try:
    config = config_lib.resolve(FLAGS.experiment, _OVERRIDES)
  except config_lib.ConfigError as e:
    fail(str(e))
  if FLAGS.submit:
    return submit(config)
  if FLAGS.mode == 'plan':
    return plan(config)
  if FLAGS.mode == 'goodput':
    from brainscale.train import goodput  # noqa: PLC0415  (no JAX)
    return print(goodput.report(FLAGS.workdir or config_lib.default_workdir(FLAGS.experiment)))
  if FLAGS.mode == 'probe_plan':
    return probe_plan(config)
  with errors.funnel(FLAGS.traceback):
    run(config, FLAGS.workdir or config_lib.default_workdir(FLAGS.experiment))


def entry():
  """`python launch/run.py ...` and the `brainscale ...` command (pyproject.toml): the
  --config.KEY=VALUE overrides leave argv before absl parses the flags; exits."""
  _OVERRIDES[:], rest = config_lib.split_overrides(sys.argv)
  usage_lib.answer_help(rest, usage_lib.brainscale_usage(), flag_owner='experiment')
  app.run(main, argv=rest)


if __name__ == '__main__':
  entry()
