"""The trainer, read top to bottom: prerequisite runs, then resume or start, then the loop.

It knows no model family: everything model-specific comes through the Task
(brainscale/train/task.py), found by name from `config.task`. The state and the
jitted steps are built by train/step.py; `train` may first train the runs the task
starts from (train/prerequisites.py). The loop dispatches step t+1 before it reads
step t's metrics, so the host never stalls the device.
"""

import contextlib
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from brainscale.train import events, goodput, preemption, profile, report, watchdog
from brainscale.train.checkpoint import Checkpoints
from brainscale.train.prerequisites import prerequisite_params, runs_to_train
from brainscale.train.step import (
  Setup,
  build,
  evaluate_params,
  global_batch,
  init_state,
  make_train_step,
)
from brainscale.train.task import Costs


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN/inf; training stops."""


def _check_finite(step: int, metrics: dict, last_checkpoint):
  """The loss and the gradient norm must be finite; other metrics may be NaN on a step that
  had nothing for them to measure (report.average leaves those out)."""
  bad = {k: metrics[k] for k in ('loss', 'grad_norm')
         if k in metrics and not np.isfinite(metrics[k])}
  if bad:
    names = ', '.join(f'{k}={v}' for k, v in bad.items())
    raise NonFiniteError(f'non-finite {names} at step {step}; stopping. Newest checkpoint: '
                         f'step {last_checkpoint}')


def train(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, its prerequisite runs first (runs_to_train), each
  resuming from its newest checkpoint.

  Returns the last logged train metrics and the final eval metrics ('eval_*') of `config`.
  """
  results = {}
  for run_config, run_dir in runs_to_train(config, workdir):
    if run_dir != workdir:
      report.log(f'prerequisite run: {run_config.experiment} in {run_dir}')
    results = train_one(run_config, run_dir)
  return results


def train_one(config, workdir: str) -> dict:
  """Trains `config` in `workdir` alone, resuming from its newest checkpoint; from scratch,
  it starts from the final params of its prerequisite runs, which must be trained."""
  c = config
  os.makedirs(workdir, exist_ok=True)
  watch = watchdog.Watchdog(c, events.open_for(workdir))   # progress limits, events
  setup = build(c)
  report.log(f'mesh {dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} '
             f'devices, {jax.process_count()} process(es)')
  if 'BRAINSCALE_RUN_ID' in os.environ:   # set by the sbatch script; the same after a requeue
    report.log(f'run {os.environ["BRAINSCALE_RUN_ID"]}, SLURM job '
               f'{os.environ.get("SLURM_JOB_ID", "?")}, restart '
               f'{os.environ.get("SLURM_RESTART_COUNT", "0")}')
  with contextlib.ExitStack() as closing:   # on every exit, an exception's too
    checkpoints = Checkpoints(workdir, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
    closing.callback(checkpoints.close)     # waits until the last checkpoint is committed
    data = setup.task.train_data(jax.process_index(), jax.process_count())
    with watch.phase('restore'):
      start, state = checkpoints.restore_newest(setup.abstract_state, data, log=report.log)
    if start is None:
      state = init_state(setup)
      state['params'].update(prerequisite_params(setup, workdir))
      step = 0
      report.log(f'starting {c.experiment} from scratch in {workdir}')
    else:
      step = int(jax.device_get(state['step']))
      report.log(f'resuming from step {step} ({checkpoints.directory / str(start)})')
    watch.ready(step)
    if step >= c.train.steps:
      watch.close()
      return _complete(setup, state, step, workdir)

    writer = report.Writer(workdir, c)
    closing.callback(writer.close)
    if step:   # resuming: the account of the attempts before this one
      goodput.write_scalars(writer, workdir, step)
    first = watch.next(data)
    train_step = make_train_step(setup, first)
    profiler = profile.Profiler(c, workdir, step, log=report.log, hlo_text=lambda: train_step.lower(
        setup.abstract_state, global_batch(setup, first)).compile().as_text())
    progress = report.Progress(
        first_step=step, last_step=c.train.steps, batch_size=c.train.batch_size,
        flops_per_step=(setup.task.flops_per_example() * c.train.batch_size
                        if isinstance(setup.task, Costs) else 0.0),
        peak_flops=report.peak_flops_per_device(c), num_devices=jax.device_count())
    metrics_log = _MetricsLog(c, progress, writer, checkpoints)
    batch = first
    with preemption.Notice() as notice:
      while step < c.train.steps:
        state, metrics = train_step(state, global_batch(setup, batch))
        step += 1
        watch.step(step)
        profiler.step(step, state)
        # Read a logging step's metrics only once the next step is queued behind it.
        if metrics_log.log_step_pending():
          metrics_log.flush()
        metrics_log.add(step, metrics)
        preempted = notice.reached(step)   # every process, every step
        if preempted or step % c.checkpoint.every_steps == 0 or step == c.train.steps:
          metrics_log.flush()  # never checkpoint a state whose loss is not finite
          with watch.phase('save', step):
            checkpoints.save(step, state, data, c, force=preempted)
        if preempted:
          with watch.phase('save', step):
            closing.close()   # the checkpoint committed, the writer closed
          report.log(f'SIGTERM: stopped at the agreed step {step}; checkpoint saved')
          raise preemption.Preempted(step)
        if c.train.eval_every and step % c.train.eval_every == 0 and step < c.train.steps:
          with watch.phase('eval', step):
            _eval_and_write(setup, state['params'], step, writer)
        if step < c.train.steps:
          batch = watch.next(data)
    metrics_log.flush()
    with watch.phase('eval', step):
      final = _eval_and_write(setup, state['params'], step, writer)
    with watch.phase('save', step):
      checkpoints.close()   # waits until the last checkpoint is committed
    watch.close()
    goodput.write_scalars(writer, workdir, step)
  return {**metrics_log.last, **{f'eval_{k}': v for k, v in final.items()}}


class _MetricsLog:
  """The host side of train steps already dispatched: finite check, log lines, scalars.

  Metrics stay on the device until a log or checkpoint step (`flush`), then come back
  in one transfer; a non-finite value is still reported with its exact step.
  """

  def __init__(self, c, progress: report.Progress, writer: report.Writer,
               checkpoints: Checkpoints):
    self.c, self.progress, self.writer, self.checkpoints = c, progress, writer, checkpoints
    self.pending = []   # (step, device metrics) dispatched and not read yet
    self.window = []    # host metrics of the steps since the last log line
    self.last = {}      # the last log line's averages

  def add(self, step: int, metrics: dict):
    self.pending.append((step, metrics))

  def log_step_pending(self) -> bool:
    """Whether the newest pending step is one to log."""
    return bool(self.pending) and self.pending[-1][0] % self.c.train.log_every == 0

  def flush(self):
    """Reads every pending step back: finite check, then a log line at each log step."""
    values = jax.device_get([m for _, m in self.pending])
    for (step, _), metrics in zip(self.pending, values):
      metrics = {k: float(v) for k, v in metrics.items()}
      _check_finite(step, metrics, self.checkpoints.latest())
      self.window.append(metrics)
      if step % self.c.train.log_every == 0 or step == self.c.train.steps:
        self.last = report.average(self.window)
        self.window.clear()
        rates = self.progress.rates(step)
        report.log(self.progress.line(step, self.last, rates))
        self.writer.scalars(step, {**{f'train/{k}': v for k, v in self.last.items()},
                                   **{f'perf/{k}': v for k, v in rates.items()}})
    self.pending.clear()


def _complete(setup: Setup, state, step: int, workdir: str) -> dict:
  """A finished run: writes its final eval if a crash kept it from metrics.jsonl."""
  if not _eval_missing(workdir, step):
    report.log(f'step {step} >= train.steps={setup.config.train.steps}; nothing to do')
    return {}
  report.log(f'step {step} is trained but its final eval is missing from '
             f'{workdir}/metrics.jsonl; evaluating it now')
  with contextlib.closing(report.Writer(workdir, setup.config)) as writer:
    final = _eval_and_write(setup, state['params'], step, writer)
  return {f'eval_{k}': v for k, v in final.items()}


def _eval_missing(workdir: str, step: int) -> bool:
  """Whether metrics.jsonl holds no eval of `step` (process 0 reads, all agree)."""
  missing = False
  if jax.process_index() == 0:
    try:
      record = report.read_jsonl(os.path.join(workdir, 'metrics.jsonl')).get(step, {})
    except FileNotFoundError:
      record = {}
    missing = not any(k.startswith('eval/') for k in record)
  if jax.process_count() > 1:
    missing = bool(multihost_utils.broadcast_one_to_all(np.array(missing)))
  return missing


def _eval_and_write(setup: Setup, params, step: int, writer: report.Writer) -> dict:
  start = time.perf_counter()
  metrics = evaluate_params(setup, params)
  report.log(f'eval step {step} | ' + ' | '.join(f'{k} {v:.4f}' for k, v in metrics.items())
             + f' | {time.perf_counter() - start:.1f}s')
  writer.scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  writer.flush()
  return metrics


def evaluate(config, workdir: str) -> dict:
  """Evaluates the newest checkpoint in `workdir`."""
  setup = build(config)
  with contextlib.closing(Checkpoints(workdir, keep=config.checkpoint.keep,
                                      async_save=False)) as checkpoints:
    step, state = checkpoints.restore_newest(setup.abstract_state, log=report.log,
                                             set_aside=False)
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {checkpoints.directory}; train first')
    with contextlib.closing(report.Writer(workdir, config)) as writer:
      return _eval_and_write(setup, state['params'], step, writer)
