"""Metrics, TensorBoard event files, the progress line and MFU.

Scalars are averaged over each logging interval with clu.metrics.Average and
written with tensorboardX (no TensorFlow needed), and to a Weights & Biases run
when report.wandb_project is set (wandb is imported only then). Only process 0 writes.
MFU = model FLOPs per step / (step time x devices x peak FLOP/s per device).
"""

import contextlib
import datetime
import functools
import json
import math
import os
import sys
import time
import uuid
import weakref

import jax
import numpy as np
from clu import metrics as clu_metrics

from brainscale.config import ConfigError


def log(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


@functools.cache
def matmul_flops(n: int = 1024, dtype: str = 'float32') -> float:
  """FLOP/s of one device on an n x n x n matmul in `dtype`, the best of 5 calls: the CPU
  'peak' for MFU, and benchmarks/mfu.py's measured ceiling."""
  x = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(5):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def peak_flops_per_device(config) -> float:
  """The config's peak on accelerators; a measured matmul rate on CPU."""
  if jax.devices()[0].platform == 'cpu':
    return matmul_flops()
  return config.train.peak_tflops * 1e12


def average(values: list[dict]) -> dict[str, float]:
  """Per-key means of a list of scalar metric dicts, via clu.metrics.Average.

  NaN marks a metric with nothing to measure in that dict (a task no example drew):
  it is left out of the mean, and a key NaN everywhere is left out of the result.
  """
  out = {}
  for key in values[0]:
    column = np.asarray([v[key] for v in values], np.float32)
    measured = column[~np.isnan(column)]
    if measured.size:
      out[key] = float(clu_metrics.Average(total=measured.sum(), count=measured.size).compute())
  return out


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    if f.seek(0, os.SEEK_END) == 0:
      return True
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'


def _wandb_module(config):
  """wandb if the config names a report.wandb_project, else None; a ConfigError if the
  package is missing."""
  project = config.get('report', {}).get('wandb_project') if config is not None else ''
  if not project:
    return None
  try:
    import wandb  # noqa: PLC0415 (only a run that asks for W&B needs it)
  except ImportError as e:
    raise ConfigError(f'report.wandb_project={project!r} needs the wandb package ({e}); '
                      "pip install -r requirements.txt, or set report.wandb_project=''") from None
  return wandb


def _wandb_id(workdir: str) -> str:
  """The W&B run id of this workdir: made once, kept in workdir/wandb_id, so a
  resumed or requeued run continues the same W&B run."""
  path = os.path.join(workdir, 'wandb_id')
  if not os.path.exists(path):
    with open(path, 'w') as f:
      f.write(uuid.uuid4().hex[:16] + '\n')
  with open(path) as f:
    return f.read().strip()


def _wandb_run(wandb, workdir: str, config):
  """The workdir's W&B run, its files under workdir/wandb, the config as its config."""
  r = config.report
  return wandb.init(
      project=r.wandb_project, entity=r.wandb_entity or None, mode=r.wandb_mode or None,
      name=r.wandb_name or config.experiment, id=_wandb_id(workdir), resume='allow',
      dir=workdir, config=config.to_dict(), reinit='finish_previous')


class Writer:
  """Scalars to TensorBoard (workdir/tb), workdir/metrics.jsonl and, if the config
  names a report.wandb_project, a W&B run; process 0 only.

  metrics.jsonl holds one {"step": s, name: value, ...} line per report with
  full float precision; after a crash and resume a step may appear twice, and
  the later line is the one that counts. A workdir it cannot write (an eval of a
  read-only run) gets one warning on stderr; the Writer then does nothing.
  """

  def __init__(self, workdir: str, config=None):
    self.workdir = workdir
    self._writer, self._jsonl, self._wandb = None, None, None
    _OPEN_WRITERS.add(self)
    wandb = _wandb_module(config)  # on every process: a missing package stops them all
    if jax.process_index() == 0:
      try:
        self._open()
        if wandb is not None:
          self._wandb = _wandb_run(wandb, workdir, config)
      except OSError as e:
        self._give_up(e)

  def _open(self):
    from tensorboardX import SummaryWriter  # noqa: PLC0415 (only process 0 needs it)
    self._writer = SummaryWriter(logdir=f'{self.workdir}/tb', flush_secs=10)
    path = f'{self.workdir}/metrics.jsonl'
    cut_short = os.path.exists(path) and not _ends_with_newline(path)
    self._jsonl = open(path, 'a')
    if cut_short:  # a crash stopped the last line midway
      self._jsonl.write('\n')

  def _give_up(self, error: OSError):
    """Warns once and stops writing."""
    print(f'brainscale: warning: cannot write metrics to {self.workdir} '
          f'({error.strerror or error}); TensorBoard events and metrics.jsonl are skipped',
          file=sys.stderr, flush=True)
    writer, jsonl, run = self._writer, self._jsonl, self._wandb
    self._writer, self._jsonl, self._wandb = None, None, None
    for f in (writer, jsonl):
      if f is not None:
        with contextlib.suppress(Exception):
          f.close()
    if run is not None:
      run.finish()

  @property
  def active(self) -> bool:
    """Whether this Writer writes (process 0, a writable workdir)."""
    return self._writer is not None

  def scalars(self, step: int, scalars: dict[str, float]):
    if self._writer is None:
      return
    try:
      for name, value in scalars.items():
        self._writer.add_scalar(name, value, step)
      self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
      self._jsonl.flush()
    except OSError as e:
      self._give_up(e)
      return
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)

  def flush(self):
    if self._writer is not None:
      try:
        self._writer.flush()
      except OSError as e:
        self._give_up(e)

  def close(self):
    _OPEN_WRITERS.discard(self)
    if self._writer is not None:
      try:
        self._writer.close()
        self._jsonl.close()
      except OSError as e:
        self._give_up(e)   # closes what is left quietly, ends the W&B run
      self._writer, self._jsonl = None, None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


_OPEN_WRITERS = weakref.WeakSet()


def close_writers():
  """Closes every Writer still open (a run leaving on an error), so that no writer flushes
  at exit into a full disk, and the W&B run ends."""
  for writer in list(_OPEN_WRITERS):
    with contextlib.suppress(Exception):
      writer.close()


def read_jsonl(path) -> dict[int, dict]:
  """metrics.jsonl -> {step: scalars}, the last line of a step winning.

  A line cut short by a crash is skipped.
  """
  out = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      out.setdefault(row.pop('step'), {}).update(row)
  return out


class Progress:
  """Steps/s, examples/s, ETA and MFU over the interval since the last report."""

  def __init__(self, *, first_step: int, last_step: int, batch_size: int,
               flops_per_step: float, peak_flops: float, num_devices: int):
    self.last_step, self.batch_size = last_step, batch_size
    self.flops_per_step, self.peak = flops_per_step, peak_flops * num_devices
    self._step, self._time = first_step, time.perf_counter()

  def rates(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_s = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    rates = {'steps_per_s': steps_per_s, 'examples_per_s': steps_per_s * self.batch_size}
    if self.flops_per_step:   # a task without Costs has no MFU
      rates['mfu'] = steps_per_s * self.flops_per_step / self.peak
    return rates

  def line(self, step: int, metrics: dict, rates: dict) -> str:
    eta = (self.last_step - step) / max(rates['steps_per_s'], 1e-9)
    parts = [f'step {step}/{self.last_step}']
    ordered = sorted(metrics, key=lambda k: (k != 'loss', k))
    parts += [f'{k} {metrics[k]:.4g}' for k in ordered]
    parts += [f"{rates['steps_per_s']:.2f} steps/s", f"{rates['examples_per_s']:.0f} ex/s",
              f'ETA {datetime.timedelta(seconds=round(eta))}']
    if 'mfu' in rates:
      parts.append(f"MFU {100 * rates['mfu']:.1f}%")
    return ' | '.join(parts)
