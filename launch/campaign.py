"""The campaign policy: what the sbatch script does after each attempt of a run.

The script (launch/slurm.py) calls `python -m launch.campaign begin` before its srun
and `... end --status=S` after it. `end` reads what each task recorded (its events,
train/events.py: exit code and cause, last step, node), srun's own error lines and
JAX's "unhealthy task" messages, and decides:

- done (every task exited 0): the run is complete;
- a failure a restart would repeat (bad input 2, a checkpoint that cannot be written
  74, a non-finite loss or a bug 1): stop, no requeue;
- preempted (75, checkpoint saved): requeue; not counted against the budget;
- anything a restart can cure (a task killed by a signal or lost with its node, a
  crash outside Python, JAX's distributed service aborting, a lost peer 69, a hang 124):
  restart, at most `cluster.max_restarts` times over the run, and stop once
  `cluster.max_stalled_restarts` restarts in a row made no new checkpoint. The next
  attempt is a new job, `sbatch --exclude=NODES --dependency=afterany:JOB` of the same
  script (`scontrol update` cannot change a running job's nodes, and a requeued job can
  be hit by the late kill of its previous incarnation when slurmd answers slowly). The
  node of the task that failed first is left out when the partition has nodes to spare
  (at most `cluster.max_excluded`, oldest dropped first; never so many that the job no
  longer fits).

Each decision is one line in logs/slurm-JOBID.out; the state lives in WORKDIR/campaign.json.
Imports no JAX.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

from brainscale.train import events as events_lib

STOP = {1: 'a non-finite loss or a bug', 2: 'bad input', 74: 'a checkpoint cannot be written'}
PREEMPTED = 75
CURABLE_CAUSES = {'hang', 'peer_lost'}
STOP_CAUSES = {'input': 2, 'checkpoint': 74, 'nonfinite': 1, 'bug': 1, 'failed': 1}

_SRUN_ERROR = re.compile(r'^srun: error: (\S+): tasks? (\d+)(?:-\d+)?: (.+)$', re.M)
# JAX's coordination service names a silent task: "Task 1 heartbeat timeout", or
# "The following tasks are unhealthy (stopped sending heartbeats):" then one task a line
# (a number, or /job:jax_worker/replica:0/task:N in older versions).
_HEARTBEAT_TIMEOUT = re.compile(r'Task (\d+) heartbeat timeout')
_UNHEALTHY = re.compile(
    r'unhealthy \(stopped sending heartbeats\):[ \t]*\n((?:[ \t]*\S*?\d+[ \t]*\n)+)')
_TASK = re.compile(r'(?:task:)?(\d+)\s*$')


def log(message: str):
  print(f'brainscale campaign: {message}', flush=True)


# --- the run's state -----------------------------------------------------------------------


def _state_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / 'campaign.json'


def load_state(workdir) -> dict:
  path = _state_path(workdir)
  if path.exists():
    return json.loads(path.read_text())
  return {'restarts': 0, 'stalled': 0, 'excluded': [], 'attempts': []}


def save_state(workdir, state: dict):
  path = _state_path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(state, indent=1) + '\n')
  os.replace(tmp, path)


def newest_checkpoint(workdir) -> int | None:
  """The newest committed checkpoint step (Orbax names a step's folder by its number only
  once it is complete)."""
  folder = pathlib.Path(workdir) / 'checkpoints'
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
  return max(steps, default=None)


def _attempt_name() -> str:
  return f'{os.environ.get("SLURM_JOB_ID", "0")}.{os.environ.get("SLURM_RESTART_COUNT", "0")}'


def begin(workdir) -> int:
  """Records the job's start; returns this attempt's number in the run (0 first)."""
  state = load_state(workdir)
  last = state['attempts'][-1] if state['attempts'] else None
  if last is not None and 'action' not in last:   # the job died with its script (node lost)
    last.update(action='restarted by SLURM', cause='the batch script ended without a decision')
    state['restarts'] += 1
  logs = sorted(pathlib.Path(workdir, 'logs').glob(f'{os.environ.get("SLURM_JOB_ID", "0")}-*.log'))
  state['attempts'].append({
      'attempt': len(state['attempts']), 'name': _attempt_name(),
      'job': os.environ.get('SLURM_JOB_ID', ''), 'nodes': os.environ.get('SLURM_JOB_NODELIST', ''),
      'checkpoint_before': newest_checkpoint(workdir),
      'log_offsets': {p.name: p.stat().st_size for p in logs}})
  save_state(workdir, state)
  events_lib.Events(workdir, events_lib.BATCH).record(
      'job_start', job=os.environ.get('SLURM_JOB_ID', ''),
      restart=int(os.environ.get('SLURM_RESTART_COUNT', 0)), attempt=len(state['attempts']) - 1)
  return len(state['attempts']) - 1


# --- what happened in an attempt ----------------------------------------------------------


@dataclasses.dataclass
class Task:
  rank: int
  node: str = ''
  exit: dict | None = None        # its exit event, if it recorded one
  last_t: float | None = None     # its last event
  last_step: int | None = None
  srun: str = ''                  # what srun said of it

  def stopped_t(self) -> float | None:
    """When it stopped making progress: a hang's start, or its last event."""
    if self.exit and self.exit.get('cause') == 'hang':
      return self.exit['t'] - self.exit.get('waited_s', 0.0)
    return self.last_t

  def describe(self) -> str:
    where = f'task {self.rank}' + (f' on {self.node}' if self.node else '')
    if self.exit:
      text = f'exit {self.exit["code"]} ({self.exit["cause"]})'
      if self.exit.get('message'):
        text += f': {self.exit["message"]}'
    elif self.srun:
      text = f'{self.srun}, no exit recorded'
    else:
      text = 'no exit recorded (lost, killed, or crashed outside Python)'
    step = f' after step {self.last_step}' if self.last_step is not None else ''
    return f'{where}{step}: {text}'


def tasks_of(workdir, name: str, srun_text: str, ntasks: int) -> list[Task]:
  """Each task of attempt `name`, from its events and srun's error lines."""
  recorded = events_lib.by_attempt(workdir).get(name, {})
  tasks = {r: Task(r) for r in range(ntasks)}
  for rank, events in recorded.items():
    if not rank.isdigit():
      continue
    task = tasks.setdefault(int(rank), Task(int(rank)))
    for e in events:
      task.last_t = e['t']
      if e['event'] == 'start':
        task.node = e.get('node') or e.get('host', '')
      elif e['event'] in ('step', 'compile', 'ready'):
        task.last_step = e['step']
      elif e['event'] == 'exit':
        task.exit = e
  for node, rank, what in _SRUN_ERROR.findall(srun_text):
    task = tasks.setdefault(int(rank), Task(int(rank)))
    task.srun = task.srun or what.strip()
    task.node = task.node or node
  return [tasks[r] for r in sorted(tasks)]


def first_srun_failure(srun_text: str) -> int | None:
  found = _SRUN_ERROR.search(srun_text)
  return int(found.group(2)) if found else None


def unhealthy_tasks(workdir, offsets: dict) -> set[int]:
  """Tasks JAX's coordination service declared dead (missing heartbeats) in this attempt."""
  named = set()
  for path in pathlib.Path(workdir, 'logs').glob(f'{os.environ.get("SLURM_JOB_ID", "0")}-*.log'):
    with open(path, errors='replace') as f:
      f.seek(offsets.get(path.name, 0))
      text = f.read()
    named |= {int(t) for t in _HEARTBEAT_TIMEOUT.findall(text)}
    for block in _UNHEALTHY.findall(text):
      named |= {int(m.group(1)) for line in block.splitlines() if (m := _TASK.search(line))}
  return named


def culprit(tasks: list[Task], srun_first: int | None, unhealthy: set[int]) -> Task | None:
  """The task whose failure came first: one JAX named unhealthy; else of those whose
  watchdog fired, the one furthest behind (lowest step, then stopped earliest: the others
  wait for it in a collective); else srun's first failure if it left no exit; else the
  silent task that stopped earliest."""
  by_rank = {t.rank: t for t in tasks}
  for rank in sorted(unhealthy):
    if rank in by_rank:
      return by_rank[rank]
  hung = [t for t in tasks if t.exit and t.exit.get('cause') == 'hang']
  if hung:
    return min(hung, key=lambda t: (t.exit.get('step') if t.exit.get('step') is not None
                                    else -1, t.stopped_t()))
  suspects = [t for t in tasks if t.exit is None]
  if srun_first in by_rank and by_rank[srun_first] in suspects:
    return by_rank[srun_first]
  timed = [t for t in suspects if t.stopped_t() is not None]
  if timed:
    return min(timed, key=lambda t: t.stopped_t())
  return suspects[0] if suspects else None


def verdict(status: int, tasks: list[Task], srun_first: int | None) -> tuple[str, str]:
  """('done' | 'stop' | 'preempted' | 'restart', why)."""
  exits = [t.exit for t in tasks if t.exit]
  if status == 0 and all(t.exit and t.exit['code'] == 0 for t in tasks):
    return 'done', 'every task exited 0'
  if status == 0:
    return 'done', 'srun exited 0'
  if status == PREEMPTED and all(e['code'] == PREEMPTED for e in exits):
    return 'preempted', 'SIGTERM: checkpoint saved (exit 75)'
  first = {t.rank: t for t in tasks}.get(srun_first)
  stopping = [t for t in tasks if t.exit and t.exit.get('cause') in STOP_CAUSES]
  if first is not None and first.exit and first.exit.get('cause') in STOP_CAUSES:
    return 'stop', f'{STOP.get(first.exit["code"], "a failure")} (exit {first.exit["code"]})'
  if stopping and len(stopping) == len(tasks):
    code = stopping[0].exit['code']
    return 'stop', f'{STOP.get(code, "a failure")} (exit {code})'
  if not exits and all(t.last_t is None for t in tasks) and status in STOP:
    return 'stop', f'srun exited {status} before any task started training; see the task logs'
  return 'restart', 'a failure a restart can cure'


# --- acting on it --------------------------------------------------------------------------


def partition_nodes() -> list[str]:
  """The nodes of this job's partition (sinfo)."""
  partition = os.environ.get('SLURM_JOB_PARTITION', '')
  command = ['sinfo', '-h', '-N', '-o', '%N'] + (['-p', partition] if partition else [])
  try:
    done = subprocess.run(command, capture_output=True, text=True)
  except OSError:
    return []
  return sorted(set(done.stdout.split())) if done.returncode == 0 else []


def exclusion(excluded: list[str], node: str, *, max_excluded: int, job_nodes: int,
              available: list[str]) -> list[str]:
  """The exclusion list with `node` added last, bounded so that the job still fits the
  partition's `available` nodes (the oldest dropped first)."""
  room = min(max_excluded, len(available) - job_nodes)
  if room <= 0:
    return []
  out = [n for n in excluded if n != node and n in available]
  out += [node] if node in available else []
  return out[-room:]


def end(args) -> int:
  """Decides and acts after the attempt's srun; returns the batch script's exit status."""
  workdir, state = args.workdir, load_state(args.workdir)
  attempt = state['attempts'][-1]
  job = os.environ.get('SLURM_JOB_ID', '0')
  srun_text = pathlib.Path(args.srun_log).read_text(errors='replace') \
      if args.srun_log and os.path.exists(args.srun_log) else ''
  ntasks = int(os.environ.get('SLURM_NTASKS', 1))
  tasks = tasks_of(workdir, attempt['name'], srun_text, ntasks)
  srun_first = first_srun_failure(srun_text)
  kind, why = verdict(args.status, tasks, srun_first)
  checkpoint = newest_checkpoint(workdir)
  attempt.update(status=args.status, checkpoint_after=checkpoint, verdict=kind)
  events_lib.Events(workdir, events_lib.BATCH).record('job_end', status=args.status, verdict=kind)
  errors = '; '.join(t.describe() for t in tasks)
  name = f'run {args.run} attempt {attempt["attempt"]} (job {job})'

  def finish(action: str, code: int) -> int:
    attempt['action'] = action
    save_state(workdir, state)
    return code

  if kind == 'done':
    log(f'{name} completed: {why}')
    return finish('done', 0)
  if kind == 'stop':
    log(f'stopped {name}: {why}; a restart would repeat it. Last errors: {errors}')
    return finish('stopped', args.status)
  if kind == 'preempted':
    log(f'{name} preempted: {why}; requeued')
    finish('requeued', args.status)
    _requeue(job)
    return args.status

  bad = culprit(tasks, srun_first, unhealthy_tasks(workdir, attempt.get('log_offsets', {})))
  progressed = checkpoint is not None and checkpoint != attempt.get('checkpoint_before')
  if attempt['attempt'] > 0:   # this attempt was itself a restart
    state['stalled'] = 0 if progressed else state['stalled'] + 1
  cause = f'{bad.describe()}' if bad else f'srun exited {args.status}'
  if state['restarts'] >= args.max_restarts:
    log(f'stopped {name}: the restart budget is spent ({state["restarts"]} of '
        f'cluster.max_restarts={args.max_restarts}); failed: {cause}. Last errors: {errors}')
    return finish('stopped: budget', args.status)
  if state['stalled'] >= args.max_stalled:
    log(f'stopped {name}: {state["stalled"]} restarts in a row made no new checkpoint '
        f'(cluster.max_stalled_restarts={args.max_stalled}; newest: '
        f'{"step " + str(checkpoint) if checkpoint is not None else "none"}); failed: {cause}. '
        f'Last errors: {errors}')
    return finish('stopped: no progress', args.status)

  state['restarts'] += 1
  node = bad.node if bad else ''
  excluded = exclusion(state['excluded'], node, max_excluded=args.max_excluded,
                       available=partition_nodes(),
                       job_nodes=int(os.environ.get('SLURM_JOB_NUM_NODES', 1)))
  state['excluded'] = excluded
  if node and node in excluded:
    left_out = f'node {node} excluded'
  elif node:
    left_out = f'node {node} kept: the partition has no node to spare'
  else:
    left_out = 'no node to blame'
  next_job = _resubmit(args.script, job, excluded)
  log(f'{name} failed: {cause}; restart {state["restarts"]} of {args.max_restarts}: '
      f'{left_out}; resubmitted as job {next_job}'
      + (f' (--exclude={",".join(excluded)})' if excluded else ''))
  return finish(f'resubmitted as {next_job}', args.status)


def _requeue(job: str):
  """The last thing the script does: SLURM's requeue signals its process group."""
  subprocess.run(['scontrol', 'requeue', job], check=False)


def _resubmit(script: str, job: str, excluded: list[str]) -> str:
  """The next attempt: the same script, once this job has ended, without `excluded`."""
  command = ['sbatch', f'--dependency=afterany:{job}', script]
  if excluded:
    command.insert(1, f'--exclude={",".join(excluded)}')
  try:
    done = subprocess.run(command, capture_output=True, text=True)
  except OSError as e:
    log(f'sbatch of the next attempt failed: {e}')
    return '?'
  found = re.search(r'Submitted batch job (\d+)', done.stdout)
  if done.returncode or not found:
    log(f'sbatch of the next attempt failed: {(done.stderr or done.stdout).strip()}')
    return '?'
  return found.group(1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m launch.campaign', description=__doc__)
  parser.add_argument('action', choices=['begin', 'end'])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--run', default='')
  parser.add_argument('--status', type=int, default=0)
  parser.add_argument('--srun_log', default='')
  parser.add_argument('--script', default='')
  parser.add_argument('--max_restarts', type=int, default=20)
  parser.add_argument('--max_stalled', type=int, default=3)
  parser.add_argument('--max_excluded', type=int, default=4)
  args = parser.parse_args(argv)
  if args.action == 'begin':
    print(begin(args.workdir))
    return 0
  return end(args)


if __name__ == '__main__':
  sys.exit(main())
