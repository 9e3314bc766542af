"""Metrics, TensorBoard event files, the progress line and MFU.

Scalars are averaged over each logging interval with clu.metrics.Average and
written with tensorboardX (no TensorFlow needed). Only process 0 writes.
MFU = model FLOPs per step / (step time x devices x peak FLOP/s per device).
"""

import datetime
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics


def log(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


@functools.cache
def measured_cpu_flops() -> float:
  """FLOP/s of one CPU device on a 1024^2 float32 matmul (the CPU 'peak' for MFU)."""
  n = 1024
  x = jnp.ones((n, n), jnp.float32)
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
    return measured_cpu_flops()
  return config.train.peak_tflops * 1e12


def average(values: list[dict]) -> dict[str, float]:
  """Per-key means of a list of scalar metric dicts, via clu.metrics.Average."""
  out = {}
  for key in values[0]:
    column = np.asarray([v[key] for v in values], np.float32)
    out[key] = float(clu_metrics.Average(total=column.sum(), count=len(column)).compute())
  return out


class Writer:
  """TensorBoard scalars under workdir/tb (process 0 only)."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(logdir=logdir, flush_secs=10)

  def scalars(self, step: int, scalars: dict[str, float]):
    if self._writer is not None:
      for name, value in scalars.items():
        self._writer.add_scalar(name, value, step)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


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
    return {'steps_per_s': steps_per_s,
            'examples_per_s': steps_per_s * self.batch_size,
            'mfu': steps_per_s * self.flops_per_step / self.peak}

  def line(self, step: int, metrics: dict, rates: dict) -> str:
    eta = (self.last_step - step) / max(rates['steps_per_s'], 1e-9)
    parts = [f'step {step}/{self.last_step}']
    ordered = sorted(metrics, key=lambda k: (k != 'loss', k))
    parts += [f'{k} {metrics[k]:.4g}' for k in ordered]
    parts += [f"{rates['steps_per_s']:.2f} steps/s", f"{rates['examples_per_s']:.0f} ex/s",
              f'ETA {datetime.timedelta(seconds=round(eta))}', f"MFU {100 * rates['mfu']:.1f}%"]
    return ' | '.join(parts)
