"""In-run profiling: a jax.profiler trace of the production run's own steps.

`train.profile_steps=START,COUNT` traces steps START .. START+COUNT-1 (START >= 2: the
first step of an attempt compiles) into WORKDIR/tb/plugins/profile/, where TensorBoard's
profile plugin lists it beside the run's scalars; process 0 only, or every process with
`train.profile_all`. The device is drained before and after (block_until_ready), so the
window holds those steps alone. A run resumed at or past START does not profile again.
Afterwards the time per step of each kind of op (matmul, attention, fusion, collective,
...) and the ten largest ops are logged, as benchmarks/mfu.py --profile prints them.
"""

import collections
import glob
import gzip
import json
import os

import jax

from brainscale.config import ConfigError
from brainscale.plan import hlo


def window(config) -> tuple[int, int] | None:
  """(START, COUNT) of train.profile_steps, or None when it is ''."""
  text = config.train.get('profile_steps', '')
  if not text:
    return None
  try:
    start, count = (int(x) for x in str(text).split(','))
  except ValueError:
    start = count = 0
  if start < 2 or count < 1:
    raise ConfigError(f'train.profile_steps={text!r}: expected START,COUNT with START >= 2 '
                      '(the first step compiles) and COUNT >= 1, e.g. 10,3')
  return start, count


def trace_op_times(trace_dir: str) -> collections.Counter:
  """Device time (s) per HLO op name in the newest perfetto trace under trace_dir.

  On a GPU the profiler derives an "XLA Ops" line per device (kernels grouped by
  the op that launched them): only that line is read, so nothing counts twice.
  Elsewhere every complete event of the device (or, on CPU, the host) counts,
  named by its `hlo_op` argument where it has one.
  """
  paths = sorted(glob.glob(f'{trace_dir}/**/*perfetto_trace.json.gz', recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {trace_dir}')
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  meta = lambda kind: {(e['pid'], e.get('tid')): e.get('args', {}).get('name', '')
                       for e in events if e.get('ph') == 'M' and e.get('name') == kind}
  devices = {pid for (pid, _), name in meta('process_name').items() if '/device:' in name}
  op_lines = {key for key, name in meta('thread_name').items()
              if key[0] in devices and name == 'XLA Ops'}
  times = collections.Counter()
  for e in events:
    if e.get('ph') != 'X' or (devices and e['pid'] not in devices):
      continue
    if op_lines and (e['pid'], e.get('tid')) not in op_lines:
      continue
    args = e.get('args') or {}
    times[args.get('hlo_op') or e['name']] += e.get('dur', 0) * 1e-6
  return times


def profile_summary(trace_dir: str, hlo_text: str, steps: int) -> dict:
  """Milliseconds per step of each op kind and of the ten largest ops, from a trace."""
  kinds = hlo.op_kinds(hlo_text)
  times = {op: t for op, t in trace_op_times(trace_dir).items()
           if kinds.get(op, 'control') != 'control'}
  if not times:
    raise ValueError(f'no trace event under {trace_dir} names an op of the compiled step')
  per_kind = collections.Counter()
  for op, t in times.items():
    per_kind[kinds[op]] += t
  ms = lambda t: round(1e3 * t / steps, 3)
  return {'kinds_ms': {k: ms(t) for k, t in per_kind.most_common()},
          'top_ops_ms': [(op, kinds[op], ms(t)) for op, t in
                         collections.Counter(times).most_common(10)],
          'busy_ms': ms(sum(times.values()))}


def summary_lines(summary: dict) -> list[str]:
  lines = [f"profile: {summary['busy_ms']:.3f} ms busy per step"]
  lines += [f'  {kind:<34s} {t:10.3f} ms' for kind, t in summary['kinds_ms'].items()]
  lines += [f'    {op:<40s} {kind:<34s} {t:10.3f} ms' for op, kind, t in summary['top_ops_ms']]
  return lines


class Profiler:
  """Starts and stops the trace around the window; the loop calls `step` after each step."""

  def __init__(self, config, workdir: str, first_step: int, hlo_text, log=print):
    """first_step: the step this attempt starts from; hlo_text(): the compiled step's HLO."""
    found = window(config)
    self.directory = os.path.join(workdir, 'tb')
    self.hlo_text, self.log, self.tracing = hlo_text, log, False
    mine = config.train.get('profile_all', False) or jax.process_index() == 0
    self.start, self.stop = (found[0], found[0] + found[1] - 1) if found else (0, -1)
    self.enabled = bool(found) and mine and first_step < self.start - 1
    if found and mine and not self.enabled:
      log(f'train.profile_steps: this attempt starts at step {first_step}, at or past the '
          f'window {self.start}..{self.stop}; not profiling')

  def step(self, step: int, state):
    """After step `step` was dispatched."""
    if not self.enabled:
      return
    if step == self.start - 1:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.tracing = True
    elif step == self.stop and self.tracing:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.tracing, self.enabled = False, False
      self.log(f'profiled steps {self.start}..{self.stop} into {self.directory}/plugins/profile')
      try:
        summary = profile_summary(self.directory, self.hlo_text(), self.stop - self.start + 1)
      except (ValueError, FileNotFoundError) as e:
        self.log(f'profile: no per-kind table ({e})')
        return
      for line in summary_lines(summary):
        self.log(line)
