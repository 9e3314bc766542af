"""Goodput: how much of a run's wall time, over all its attempts, became training.

Read back from the events alone (train/events.py; `--mode=goodput` imports no JAX),
as ml-goodput-measurement defines it: wall time runs from the run's first event to its
last; process 0's and the sbatch script's events cut it into intervals, each charged to
the event that ends it, so the causes sum to the wall time exactly. A step's time is
productive unless a later attempt restored from a checkpoint before it: then the step
was redone and its first time is lost. The first step of each attempt is compile time.
"""

import datetime

from brainscale.train import events as events_lib

# Each cause of lost time, in the order reports list them.
LOST = {
    'launch': 'start-up: launch, imports, JAX init',
    'init': 'start-up: model, data, state',
    'restore': 'checkpoint restore',
    'compile': 'first step of each attempt (compile)',
    'redone': 'steps redone after an interruption',
    'data': 'waiting for data',
    'save': 'checkpoint saves (blocking)',
    'eval': 'evaluation',
    'hang': 'hangs until the watchdog fired',
    'teardown': 'ends of attempts (exit, failure detection, teardown)',
    'between': 'between attempts (requeue and queue wait)',
    'other': 'other host time',
}


def _timeline(workdir) -> list[dict]:
  """Process 0's and the batch script's events of every attempt, and any process's exit by
  its hang watchdog (the others wait for the hung one), in time order."""
  timeline = []
  for name, ranks in events_lib.by_attempt(workdir).items():
    for rank, events in ranks.items():
      mine = rank in ('0', events_lib.BATCH)
      timeline += [dict(e, attempt=name, rank=rank) for e in events
                   if mine or (e['event'] == 'exit' and e.get('cause') == 'hang')]
  return sorted(timeline, key=lambda e: e['t'])


def _charge(previous: dict, event: dict, lost: dict, steps: list):
  """Charges the interval ending at `event` to its cause."""
  interval = event['t'] - previous['t']
  kind = event['event']
  new_attempt = event['attempt'] != previous['attempt']
  if kind == 'job_start' or (new_attempt and kind == 'start'):
    lost['between'] += interval
  elif kind == 'start':
    lost['launch'] += interval
  elif kind in ('restore', 'save', 'eval'):   # spans: the part before it began is other
    inside = min(interval, max(event['t'] - event['t0'], 0.0))
    lost[kind] += inside
    lost['other'] += interval - inside
  elif kind == 'ready':
    lost['init'] += interval
  elif kind == 'compile':
    lost['compile'] += interval
  elif kind == 'step':
    data = min(event.get('data_s', 0.0), interval)
    lost['data'] += data
    steps.append([event['step'], interval - data, event['attempt']])
  elif kind == 'exit' and event.get('cause') == 'hang':
    lost['hang'] += interval
  elif kind in ('exit', 'job_end'):
    lost['teardown'] += interval
  else:
    lost['other'] += interval


def account(workdir) -> dict:
  """{wall_s, productive_s, lost_s: {cause: s}, steps_redone, redone_steps, attempts,
  interruptions, first_t, last_t} of the run in `workdir`; None when it has no events."""
  timeline = _timeline(workdir)
  if not timeline:
    return None
  lost = dict.fromkeys(LOST, 0.0)
  steps, redone = [], []   # [step, seconds, attempt] of each productive step so far
  for previous, event in zip(timeline, timeline[1:]):
    if event['event'] == 'ready':   # restored here: later steps done before are redone
      keep = [s for s in steps if s[0] <= event['step']]
      redone += [s for s in steps if s[0] > event['step']]
      steps = keep
    _charge(previous, event, lost, steps)
  lost['redone'] = sum(s[1] for s in redone)
  attempts = sorted({e['attempt'] for e in timeline}, key=lambda a: min(
      e['t'] for e in timeline if e['attempt'] == a))
  done = [e for e in timeline if e['event'] == 'exit' and e.get('cause') == 'done']
  return dict(
      wall_s=timeline[-1]['t'] - timeline[0]['t'], productive_s=sum(s[1] for s in steps),
      lost_s=lost, steps_redone=len(redone), redone_steps=sorted(s[0] for s in redone),
      attempts=len(attempts), interruptions=len(attempts) - 1 if done else len(attempts),
      first_t=timeline[0]['t'], last_t=timeline[-1]['t'])


def _hms(seconds: float) -> str:
  return str(datetime.timedelta(seconds=round(seconds)))


def report(workdir) -> str:
  """The --mode=goodput text: wall time, productive time and each cause of lost time."""
  a = account(workdir)
  if a is None:
    return f'no events in {workdir}/{events_lib.FOLDER}; train there first'
  wall = a['wall_s'] or 1e-9
  lines = [f'goodput of {workdir}: {a["attempts"]} attempt(s), {a["interruptions"]} '
           f'interruption(s), wall time {_hms(a["wall_s"])} ({a["wall_s"]:.1f} s)',
           f'  {"productive training steps":52s} {a["productive_s"]:10.1f} s '
           f'{100 * a["productive_s"] / wall:6.2f}%']
  for cause, seconds in a['lost_s'].items():
    note = ''
    if cause == 'redone' and a['steps_redone']:
      note = f'  ({a["steps_redone"]} steps: {_ranges(a["redone_steps"])})'
    lines.append(f'  {LOST[cause]:52s} {seconds:10.1f} s {100 * seconds / wall:6.2f}%{note}')
  lines.append(f'goodput: {100 * a["productive_s"] / wall:.2f}%')
  return '\n'.join(lines)


def _ranges(steps: list[int]) -> str:
  """1,2,3,7 -> '1-3, 7'."""
  out, start = [], None
  for i, s in enumerate(steps):
    if start is None:
      start = s
    if i + 1 == len(steps) or steps[i + 1] != s + 1:
      out.append(f'{start}-{s}' if s != start else f'{s}')
      start = None
  return ', '.join(out)


def scalars(workdir) -> dict[str, float]:
  """The account as TensorBoard scalars (goodput/*)."""
  a = account(workdir)
  if a is None:
    return {}
  out = {'goodput/goodput': a['productive_s'] / (a['wall_s'] or 1e-9),
         'goodput/wall_s': a['wall_s'], 'goodput/productive_s': a['productive_s'],
         'goodput/steps_redone': float(a['steps_redone']),
         'goodput/interruptions': float(a['interruptions'])}
  out.update({f'goodput/lost_{cause}_s': s for cause, s in a['lost_s'].items()})
  return out


def write_scalars(writer, workdir, step: int):
  """Adds the run's goodput so far to the writer's scalars at `step` (process 0 writes)."""
  if writer.active:
    writer.scalars(step, scalars(workdir))


# --- planning a campaign's goodput (--mode=plan) -------------------------------------------

# Llama 3 405B: 419 unexpected interruptions in 54 days on 16,384 H100s (its paper's Table 5).
LLAMA3_PER_GPU_HOUR = 419 / (54 * 24 * 16384)


def mtbf_hours(cluster, gpus: int) -> float:
  """The job's mean time between interruptions: cluster.mtbf_hours, or Llama 3's rate per GPU
  times the job's GPUs (any one failing stops the job)."""
  return cluster.get('mtbf_hours', 0.0) or 1 / (LLAMA3_PER_GPU_HOUR * gpus)


def expected(*, days: float, mtbf_h: float, interval_s: float, save_s: float,
             restart_s: float) -> dict:
  """Interruptions over `days`, the cost of each (restart and restore, plus half an
  interval redone) and the expected goodput, for checkpoints every `interval_s` that each
  block training `save_s`."""
  wall_s = days * 86400
  interruptions = wall_s / (mtbf_h * 3600)
  cost_s = restart_s + interval_s / 2
  lost_s = interruptions * cost_s + (wall_s / interval_s) * save_s
  return dict(interruptions=interruptions, cost_s=cost_s, goodput=max(0.0, 1 - lost_s / wall_s))


def young_daly_s(save_s: float, mtbf_h: float) -> float:
  """The checkpoint interval that maximises goodput to first order, sqrt(2 x save x MTBF)."""
  return (2 * save_s * mtbf_h * 3600) ** 0.5


def plan_lines(config, step_s: float, gpus: int) -> list[str]:
  """--mode=plan's campaign goodput: interruptions, cost, goodput at the configured
  checkpoint interval and at Young-Daly's."""
  p, cl = config.plan, config.cluster
  mtbf_h = mtbf_hours(cl, gpus)
  restart_s = p.restart_s + p.restore_s
  interval_s = config.checkpoint.every_steps * step_s
  here = expected(days=p.days, mtbf_h=mtbf_h, interval_s=interval_s, save_s=p.save_s,
                  restart_s=restart_s)
  best_s = young_daly_s(p.save_s, mtbf_h)
  best = expected(days=p.days, mtbf_h=mtbf_h, interval_s=best_s, save_s=p.save_s,
                  restart_s=restart_s)
  source = (f'cluster.mtbf_hours={cl.mtbf_hours:g}' if cl.get('mtbf_hours', 0.0) else
            f"Llama 3's {LLAMA3_PER_GPU_HOUR * 24:.3g} per GPU-day x {gpus} GPUs")
  return [
      f'interruptions_expected: {here["interruptions"]:.2f} in {p.days:g} days  (job MTBF '
      f'{mtbf_h:.0f} h: {source})',
      f'interruption_cost_s: {here["cost_s"]:.0f}  (plan.restart_s {p.restart_s:g} + '
      f'plan.restore_s {p.restore_s:g} + half a checkpoint interval {interval_s / 2:.0f})',
      f'goodput_expected: {100 * here["goodput"]:.2f}%  (checkpoint.every_steps='
      f'{config.checkpoint.every_steps}: every {interval_s / 60:.1f} min, plan.save_s '
      f'{p.save_s:g} blocking each)',
      f'checkpoint_interval_young_daly: {best_s / 60:.1f} min = {best_s / step_s:.0f} steps '
      f'(sqrt(2 x save_s x MTBF)); goodput there {100 * best["goodput"]:.2f}%',
  ]
