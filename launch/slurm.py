"""SLURM submission: an sbatch script from an experiment's `cluster` section.

`launch/run.py --submit` writes WORKDIR/slurm/RUN_ID.sbatch, one srun step of
launch/run.py over all tasks, and hands it to sbatch (or prints it where there is
no sbatch). After the srun the script asks launch/campaign.py what to do: stop,
requeue itself (a preemption, REQUEUE_EXIT, or a failure a restart cures), or
resubmit itself without the node that failed. Imports neither JAX nor the trainer.
"""

import datetime
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

from brainscale import config as config_lib
from brainscale.plan.gpu import XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The trainer's exit status for "preempted (SIGTERM): checkpoint saved, requeue me"
# (EX_TEMPFAIL). On it the batch script runs `scontrol requeue`, SLURM runs the same
# script again with the same BRAINSCALE_RUN_ID, and training resumes from the checkpoint.
REQUEUE_EXIT = 75

# Runtime settings of every GPU job that make a failure end the process instead of
# hanging it: an NCCL error terminates (XLA's default only logs it); each process's
# stacks go to its log on a fatal signal.
FAIL_FAST_XLA_FLAGS = ('--xla_gpu_nccl_terminate_on_error=true',)

class SubmitError(RuntimeError):
  """sbatch refused the script; the message is one line."""


def absolute_workdir(experiment: str, workdir: str = '') -> pathlib.Path:
  """The absolute workdir: `workdir`, or config.default_workdir (the trainer's default)."""
  return pathlib.Path(workdir or config_lib.default_workdir(experiment)).resolve()


def tasks_per_node(cluster) -> int:
  """One task per GPU; a CPU job's node runs one unless told otherwise."""
  return cluster.tasks_per_node or max(cluster.gpus_per_node, 1)


def _header(cluster, experiment: str, workdir: pathlib.Path) -> list[str]:
  lines = [f'--job-name=brainscale-{experiment}', f'--nodes={cluster.nodes}',
           f'--ntasks-per-node={tasks_per_node(cluster)}']
  if cluster.gpus_per_node > 0:
    lines.append(f'--gres=gpu:{cluster.gpus_per_node}')  # never --gpus-per-task (BUILD.md 6)
  if cluster.cpus_per_task > 0:
    lines.append(f'--cpus-per-task={cluster.cpus_per_task}')
  lines.append(f'--time={cluster.time_limit}')
  lines += [f'--{key}={cluster[key]}' for key in ('partition', 'account', 'qos') if cluster[key]]
  lines += ['--requeue', f'--signal=TERM@{cluster.grace_s}', '--open-mode=append',
            f'--output={workdir}/logs/slurm-%j.out']
  return [f'#SBATCH {line}' for line in lines]


def _xla_flags(flags) -> str:
  """The job's XLA_FLAGS after the submitting shell's (sbatch exports them): XLA takes a
  flag's last value, so the job's own win, and the rest (a dump folder, an optimization
  level) reach every task."""
  return 'export XLA_FLAGS="${XLA_FLAGS:-} ' + ' \\\n  '.join(flags) + '"'


def _gpu_environment() -> list[str]:
  """BUILD.md sections 2 and 3; NCCL_IB_HCA and NCCL_SOCKET_IFNAME come from the
  submitting shell (sbatch exports it) since they name the cluster's own fabric."""
  return ['export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90',
          'export CUDA_DEVICE_MAX_CONNECTIONS=1',
          _xla_flags(XLA_FLAGS + FAIL_FAST_XLA_FLAGS),
          'unset NCCL_IB_DISABLE',
          'export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-1}',
          'export NCCL_DEBUG=${NCCL_DEBUG:-WARN}']


def _cpu_environment(cluster) -> list[str]:
  """One JAX CPU device per CPU a task is given."""
  devices = max(cluster.cpus_per_task, 1)
  return ['export JAX_PLATFORMS=cpu',
          _xla_flags([f'--xla_force_host_platform_device_count={devices}'])]


def _step(config, workdir: pathlib.Path, overrides: list[str]) -> str:
  """srun of launch/run.py on every task; each task logs to logs/JOBID-RANK.log."""
  log = f'{workdir}/logs/%j-%t.log'
  srun = ['srun', '--kill-on-bad-exit=1', f'--output={log}', f'--error={log}']
  if config.cluster.cpus_per_task > 0:  # srun does not inherit it from sbatch (SLURM 22.05)
    srun.append(f'--cpus-per-task={config.cluster.cpus_per_task}')
  run = [sys.executable, str(ROOT / 'launch' / 'run.py'), f'--experiment={config.experiment}',
         f'--workdir={workdir}', *overrides]
  return ' '.join(shlex.quote(arg) for arg in srun + run)


def _campaign(cluster, workdir: pathlib.Path, run_id: str, path: pathlib.Path) -> str:
  """The command line of launch/campaign.py for this run (the script appends begin|end)."""
  args = [sys.executable, '-m', 'launch.campaign', f'--workdir={workdir}', f'--run={run_id}',
          f'--script={path}', f'--max_restarts={cluster.max_restarts}',
          f'--max_stalled={cluster.max_stalled_restarts}',
          f'--max_excluded={cluster.max_excluded}']
  return ' '.join(shlex.quote(arg) for arg in args)


def script(config, *, workdir, overrides: list[str], run_id: str, path=None) -> str:
  """The sbatch script that trains `config` in `workdir` (absolute) as run RUN_ID; `path`
  is where it is written (the campaign resubmits it), WORKDIR/slurm/RUN_ID.sbatch."""
  cluster, workdir = config.cluster, pathlib.Path(workdir)
  path = pathlib.Path(path or workdir / 'slurm' / f'{run_id}.sbatch')
  q = shlex.quote
  srun_log = f'{workdir}/logs/srun-${{SLURM_JOB_ID}}.${{SLURM_RESTART_COUNT:-0}}.err'
  lines = ['#!/bin/bash', *_header(cluster, config.experiment, workdir),
           'set -u', f'cd {q(str(ROOT))}', f'mkdir -p {q(str(workdir / "logs"))}',
           f'export BRAINSCALE_RUN_ID={q(run_id)}', 'export PYTHONUNBUFFERED=1',
           'export PYTHONFAULTHANDLER=1']
  lines += _gpu_environment() if cluster.gpus_per_node > 0 else _cpu_environment(cluster)
  if cluster.gpus_per_node > 0:
    # Not for CPU jobs: JAX writes the cache from process 0 only, so after a restart process
    # 0 starts in seconds while the others compile, and Gloo's first collective gives up
    # after 30 s (seen on 2 cores: 5 s against 40-60 s, a restart after every restart).
    cache = q(str(workdir / 'jax_cache'))
    lines += [f'export JAX_COMPILATION_CACHE_DIR=${{JAX_COMPILATION_CACHE_DIR:-{cache}}}',
              'export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1']
  else:   # nor one the submitting shell had (the tests set one for themselves)
    lines += ['unset JAX_COMPILATION_CACHE_DIR']
  lines += [f'campaign=({_campaign(cluster, workdir, run_id, path)})',
            '# the attempt number of this run (0 first), across requeues and resubmissions',
            'export BRAINSCALE_ATTEMPT=$("${campaign[@]}" begin)',
            f'{_step(config, workdir, overrides)} 2>"{srun_log}"',
            'status=$?',
            f'cat "{srun_log}" >&2',
            '# done, stop, requeue, or resubmit without the failed node (launch/campaign.py)',
            f'"${{campaign[@]}}" end --status=$status --srun_log="{srun_log}"',
            'exit $?']
  return '\n'.join(lines) + '\n'


def _check(config):
  if 'cluster' in config:
    return
  having = [name for name in config_lib.experiment_names() if 'cluster' in config_lib.load(name)]
  raise config_lib.ConfigError(
      f'--submit needs a cluster section and experiment {config.experiment} has none; '
      f'experiments with one: {", ".join(having)}')


def _sbatch(path: pathlib.Path) -> int:
  done = subprocess.run(['sbatch', str(path)], capture_output=True, text=True)
  found = re.search(r'Submitted batch job (\d+)', done.stdout)
  if done.returncode or not found:
    why = (done.stderr.strip() or done.stdout.strip() or f'exit {done.returncode}').splitlines()
    raise SubmitError(f'sbatch {path} failed: {why[-1]}')
  return int(found.group(1))


def submit(config, *, workdir, overrides: list[str]) -> int | None:
  """Writes WORKDIR/slurm/RUN_ID.sbatch and submits it; the job id, or None when there
  is no sbatch here (the script is then printed)."""
  _check(config)
  workdir = absolute_workdir(config.experiment, workdir)
  run_id = f'{config.experiment}-{datetime.datetime.now():%Y%m%d-%H%M%S}'
  path = workdir / 'slurm' / f'{run_id}.sbatch'
  path.parent.mkdir(parents=True, exist_ok=True)
  (workdir / 'logs').mkdir(exist_ok=True)  # SLURM fails the launch if --output has no folder
  path.write_text(script(config, workdir=workdir, overrides=overrides, run_id=run_id,
                         path=path))
  if shutil.which('sbatch') is None:
    print(path.read_text(), end='')
    print(f'sbatch not found; wrote {path}')
    return None
  job = _sbatch(path)
  print(f'submitted job {job}: {path}')
  return job
