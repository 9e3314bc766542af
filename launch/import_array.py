"""An importer as a SLURM job array: one part per task, then the merge as a dependent job.

  python launch/import_array.py videos|sessions SOURCE OUT --parts=64 [--max_running=16]
      [--experiment=cwm_80b | --partition=P --account=A --qos=Q] [--time=12:00:00]
      [--cpus_per_task=8] [importer flags: --clip_seconds=10 ...]

Plans the next generation of parts (brainscale/data/importers/parts.py), writes
OUT/slurm/import-gGGGG.sbatch (`--array` over the parts not yet done, `%K` caps how
many run at once) and OUT/slurm/merge-gGGGG.sbatch (`afterok` on the array), and
submits both, or prints them where there is no sbatch. Rerunning it resubmits only
what is missing: the parts of a killed task, or the files added to SOURCE since; it
refuses while a job of the same OUT is still queued or running (job names carry a tag of OUT).
Logs: OUT/logs/import-gGGGG-ARRAYJOB_TASK.log and merge-JOB.log.
"""

import argparse
import hashlib
import pathlib
import shlex
import shutil
import subprocess
import sys

from brainscale import config as config_lib
from brainscale.data.importers import InputError, failed, sessions, videos
from launch import slurm

IMPORTERS = {'videos': videos, 'sessions': sessions}


def array_spec(indices: list[int], max_running: int = 0) -> str:
  """[0, 1, 2, 5] → '0-2,5' (SLURM's --array), with '%K' when max_running caps it."""
  runs = []
  for i in indices:
    if runs and runs[-1][1] == i - 1:
      runs[-1][1] = i
    else:
      runs.append([i, i])
  spec = ','.join(f'{a}-{b}' if b > a else f'{a}' for a, b in runs)
  return f'{spec}%{max_running}' if max_running else spec


def _tag(out: pathlib.Path) -> str:
  """A short name of OUT that its jobs carry, so that squeue tells whether they still run."""
  return hashlib.sha256(str(out).encode()).hexdigest()[:8]


def _job_order(job: str) -> tuple[int, int, str]:
  """squeue's job ids in submission order: '8_[0-2]' (pending tasks), '8_0', '8_1', '11'."""
  job_id, _, task = job.partition('_')
  return int(job_id), int(task) if task.isdigit() else -1, task


def _check_idle(out: pathlib.Path):
  """Raises while a job of this import is queued or running (its parts would run twice)."""
  if shutil.which('squeue') is None:
    return
  listed = subprocess.run(['squeue', '-h', '-t', 'PENDING,CONFIGURING,RUNNING,SUSPENDED', '-o',
                           '%i %j'], capture_output=True, text=True).stdout
  busy = [line.split()[0] for line in listed.splitlines() if line.endswith(f'-{_tag(out)}')]
  if busy:   # in submission order (squeue sorts by state and priority): the array, then the merge
    busy.sort(key=_job_order)
    raise InputError(f'jobs {", ".join(busy)} of this import of {out} are still queued or '
                     'running; wait for them (or scancel them), then submit again')


def _header(name: str, log: str, resources: dict) -> list[str]:
  lines = [f'--job-name={name}', '--ntasks=1', f'--cpus-per-task={resources["cpus_per_task"]}',
           f'--time={resources["time"]}']
  lines += [f'--{key}={resources[key]}' for key in ('partition', 'account', 'qos')
            if resources[key]]
  return [f'#SBATCH {line}' for line in [*lines, f'--output={log}']]


def _body(command: list[str]) -> list[str]:
  return ['set -u', f'cd {shlex.quote(str(slurm.ROOT))}', 'export PYTHONUNBUFFERED=1',
          'exec ' + ' '.join(command)]


def _importer_command(kind: str, args: argparse.Namespace, *extra: str) -> list[str]:
  """The importer's command line with the settings of this import spelled out."""
  importer = IMPORTERS[kind]
  flags = [f'--{key}={value}' for key, value in importer.settings(args).items()]
  flags += ['--quiet'] if args.quiet else []
  paths = [str(pathlib.Path(p).resolve()) for p in (args.source, args.out)]   # the job cds
  return [shlex.quote(a) for a in (sys.executable, '-m', importer.__name__, *paths,
                                   *flags)] + list(extra)


def scripts(kind: str, args: argparse.Namespace, generation, todo: list[int], resources: dict,
            max_running: int = 0, array_job: int | None = None) -> tuple[str, str]:
  """(the array script: part $SLURM_ARRAY_TASK_ID of each index in todo; the merge script,
  which runs after every task of array_job ends well)."""
  out, g = pathlib.Path(args.out).resolve(), f'g{generation.number:04d}'
  task = f'--part=${{SLURM_ARRAY_TASK_ID}}/{generation.parts}'
  workers = [f'--workers={resources["cpus_per_task"]}'] if 'workers' in vars(args) else []
  array = ['#!/bin/bash',
           *_header(f'import-{kind}-{g}-{_tag(out)}', f'{out}/logs/import-{g}-%A_%a.log',
                    resources),
           f'#SBATCH --array={array_spec(todo, max_running)}',
           *_body(_importer_command(kind, args, task, f'--generation={generation.number}',
                                    *workers))]
  after = array_job if array_job is not None else 'ARRAY_JOB_ID'
  merge = ['#!/bin/bash',
           *_header(f'import-{kind}-merge-{_tag(out)}', f'{out}/logs/merge-%j.log',
                    {**resources, 'cpus_per_task': 1}),
           f'#SBATCH --dependency=afterok:{after}', '#SBATCH --kill-on-invalid-dep=yes',
           *_body(_importer_command(kind, args, '--merge'))]
  return '\n'.join(array) + '\n', '\n'.join(merge) + '\n'


def resources(flags: argparse.Namespace) -> dict:
  """partition/account/qos: the flags, else the experiment's cluster section; time, cpus."""
  cluster = {'partition': '', 'account': '', 'qos': ''}
  if flags.experiment:
    config = config_lib.resolve(flags.experiment, [])
    slurm._check(config)
    cluster = {key: config.cluster[key] for key in cluster}
  cluster.update({k: getattr(flags, k) for k in cluster if getattr(flags, k) is not None})
  return {**cluster, 'time': flags.time, 'cpus_per_task': flags.cpus_per_task}


def submit(kind: str, args: argparse.Namespace, *, parts: int, resources: dict,
           max_running: int = 0) -> tuple[int, int] | None:
  """Plans the next generation of `args.out` and submits its missing parts and the merge;
  (array job, merge job), or None when sbatch is missing (the scripts are then printed)
  or there is nothing to do."""
  importer, out = IMPORTERS[kind], pathlib.Path(args.out).resolve()
  _check_idle(out)
  generation = importer.plan(args.source, out, parts=parts, **importer.settings(args))
  if generation is None:
    print(f'nothing to import: every file of {args.source} is in a part of {out}; '
          f'merge with: {" ".join(_importer_command(kind, args, "--merge"))}')
    return None
  todo = generation.missing(out)
  (out / 'slurm').mkdir(exist_ok=True)
  (out / 'logs').mkdir(exist_ok=True)   # SLURM fails the launch if --output has no folder
  g = f'g{generation.number:04d}'
  array_path, merge_path = out / 'slurm' / f'import-{g}.sbatch', out / 'slurm' / f'merge-{g}.sbatch'
  array_text, merge_text = scripts(kind, args, generation, todo, resources, max_running)
  array_path.write_text(array_text)
  if shutil.which('sbatch') is None:
    merge_path.write_text(merge_text)
    print(array_text + '\n' + merge_text, end='')
    print(f'sbatch not found; wrote {array_path} and {merge_path}; submit with: '
          f'job=$(sbatch --parsable {array_path}) && '
          f'sed -i "s/ARRAY_JOB_ID/$job/" {merge_path} && sbatch {merge_path}')
    return None
  array_job = slurm._sbatch(array_path)
  merge_path.write_text(scripts(kind, args, generation, todo, resources, max_running,
                                array_job)[1])
  merge_job = slurm._sbatch(merge_path)
  print(f'submitted {len(todo)} of {generation.parts} parts of generation {generation.number} '
        f'as array job {array_job} ({array_path}), the merge as job {merge_job}; '
        f'logs in {out / "logs"}')
  return array_job, merge_job


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python launch/import_array.py', allow_abbrev=False,
                                   description=__doc__.splitlines()[0])
  parser.add_argument('kind', choices=sorted(IMPORTERS))
  parser.add_argument('--parts', type=int, required=True, help='how many array tasks')
  parser.add_argument('--max_running', type=int, default=0, help='%%K: tasks at once; 0: any')
  parser.add_argument('--experiment', help="take partition, account, qos from its cluster section")
  for key in ('partition', 'account', 'qos'):
    parser.add_argument(f'--{key}')
  parser.add_argument('--time', default='12:00:00', help="each task's time limit")
  parser.add_argument('--cpus_per_task', type=int, default=8, help='= the importer\'s --workers')
  flags, rest = parser.parse_known_args(argv)
  if flags.parts < 1:
    return failed(InputError(f'--parts={flags.parts}; expected at least 1'))
  args = IMPORTERS[flags.kind].parser().parse_args(rest)
  if args.part or args.merge or args.generation:
    return failed(InputError('--part, --generation and --merge are set by the array script; '
                             'leave them out'))
  try:
    submit(flags.kind, args, parts=flags.parts, resources=resources(flags),
           max_running=flags.max_running)
  except (InputError, OSError, config_lib.ConfigError, slurm.SubmitError) as e:
    return failed(e)
  return 0


if __name__ == '__main__':
  sys.exit(main())
