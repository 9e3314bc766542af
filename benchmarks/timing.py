"""Timing shared by the benchmarks: the median of device-synchronised calls."""

import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int, warmup: int = 2) -> float:
  """Median seconds of fn(*args) over `repeats` calls, each waited for, after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
