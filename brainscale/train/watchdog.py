"""Each process watches its own progress and leaves when it stops: the hang watchdog.

A process that is alive but stuck (a hung collective, a stuck filesystem read) keeps
sending JAX's heartbeats, so nothing else notices it. The loop tells its Watchdog
what it is doing (restore, the first step's compile, each step, a save, an eval);
each phase has a time limit (config section `watchdog`), the step's learned from the
measured step time. When one runs out, the watchdog's thread writes every thread's
stack (faulthandler) to stderr, records the exit, and leaves with HANG_EXIT through
os._exit, since JAX's shutdown barrier would hold a normal exit, killing its own child
processes (data workers) first; the sbatch script then restarts the job without this node.
Outside a SLURM job nothing would restart it, so there it only warns, once per phase, and
keeps waiting. It also records each phase in the events.

Fault injection, for tests only: BRAINSCALE_FAULT=KIND:RANK:STEP makes process RANK
`hang` (alive and heartbeating, its main thread asleep) or `die` (SIGKILL) when it
finishes step STEP in the run's first attempt; STEP `start` is the first step of every
attempt. Unset, nothing is injected.
"""

import contextlib
import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
import time

from brainscale.train import events as events_lib

HANG_EXIT = 124   # no progress within the phase's limit (as `timeout` and Levanter exit)
FAULT = 'BRAINSCALE_FAULT'


def fault(spec: str, rank: int, attempt: int) -> tuple[str, int | None] | None:
  """(kind, step) of BRAINSCALE_FAULT for this process (step None: every attempt's first
  step), or None when it names another process or attempt."""
  if not spec:
    return None
  try:
    kind, target, step = spec.split(':')
    if kind not in ('hang', 'die'):
      raise ValueError
    target, step = int(target), (None if step == 'start' else int(step))
  except ValueError:
    raise ValueError(f'{FAULT}={spec!r}: expected hang|die:RANK:STEP|start, e.g. hang:1:15') \
        from None
  if target != rank or (step is not None and attempt != 0):
    return None
  return kind, step


class Watchdog:
  """Phase limits, learned step limit, the watching thread; records each phase's events."""

  def __init__(self, config, events: events_lib.Events, poll_s: float = 1.0):
    self.limits = config.watchdog
    self.enabled = config.watchdog.enabled
    self.exits = 'SLURM_JOB_ID' in os.environ   # a restart follows only under SLURM
    self.events = events
    self._intervals: list[float] = []
    self._step_limit = float(self.limits.step_s) or None
    self._last_step = None      # the last finished step of this attempt
    self._steps_seen = 0
    self._data_s = 0.0
    self._armed = ('restore', time.monotonic(), float(self.limits.restore_s))
    where = events_lib.where()
    self._fault = fault(os.environ.get(FAULT, ''), where['rank'], where['attempt'])
    self._stopped = threading.Event()
    if self.enabled:
      threading.Thread(target=self._watch, args=(poll_s,), name='brainscale-watchdog',
                       daemon=True).start()
    global _current
    _current = self

  def _arm(self, phase: str, limit_s: float):
    self._armed = (phase, time.monotonic(), limit_s)   # one assignment: the thread reads it

  @contextlib.contextmanager
  def phase(self, name: str, step: int | None = None):
    """Watches `name` (restore, save, eval, ...) with its limit; then steps again."""
    self._arm(name, float(self.limits[f'{name}_s']))
    with self.events.span(name, step=step):
      yield
    self._arm_step()

  def ready(self, step: int):
    """Restored (or initialised) at `step`: the first step, compile included, is next."""
    self.events.record('ready', step=step)
    self._last_step = step
    self._arm('compile', float(self.limits.compile_s))

  def next(self, data):
    """next(data), its wait counted towards the next step's `data_s`."""
    start = time.perf_counter()
    batch = next(data)
    self._data_s += time.perf_counter() - start
    return batch

  def step(self, step: int):
    """Step `step` was dispatched (its host side done)."""
    now = time.monotonic()
    phase, since, _ = self._armed
    self.events.record('compile' if self._steps_seen == 0 else 'step', step=step,
                       data_s=round(self._data_s, 6))
    if phase == 'step' and self._steps_seen > 0:
      self._learn(now - since)
    self._steps_seen += 1
    self._last_step, self._data_s = step, 0.0
    self._arm_step()
    if self._fault:
      kind, at = self._fault
      if at == step or (at is None and self._steps_seen == 1):
        self._inject(kind, step)

  def _learn(self, interval: float):
    """The step limit: step_factor x the slowest of the first warmup_steps intervals."""
    if self.limits.step_s or len(self._intervals) >= self.limits.warmup_steps:
      return
    self._intervals.append(interval)
    if len(self._intervals) == self.limits.warmup_steps:
      self._step_limit = max(self.limits.min_step_s,
                             self.limits.step_factor * max(self._intervals))
      self.events.record('step_limit', seconds=self._step_limit,
                         slowest_step_s=max(self._intervals))

  def _arm_step(self):
    limit = self._step_limit or float(self.limits.compile_s)   # not learned yet: generous
    self._arm('step', limit)

  def _inject(self, kind: str, step: int):
    self.events.record('fault', kind=kind, step=step)
    print(f'brainscale: {FAULT}: {kind} after step {step} (a test)', file=sys.stderr, flush=True)
    if kind == 'die':
      os.kill(os.getpid(), signal.SIGKILL)
    while not self._stopped.is_set():   # alive, heartbeating, stuck
      time.sleep(1)
    time.sleep(3600)

  def _watch(self, poll_s: float):
    warned = None
    while not self._stopped.wait(poll_s):
      armed = self._armed
      phase, since, limit = armed
      waited = time.monotonic() - since
      if waited > limit and not self._stopped.is_set() and armed is not warned:
        self._expire(phase, waited, limit)
        warned = armed   # not under SLURM: warned once for this phase, still waiting

  def _expire(self, phase: str, waited: float, limit: float):
    after = f'after step {self._last_step}' if self._last_step is not None else 'at start-up'
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    stalled = (f'no progress in {phase} for {waited:.0f} s (limit {limit:.0f} s) {after}; '
               f'every thread\'s stack is above')
    if not self.exits:
      print(f'brainscale: warning: {stalled}; not a SLURM job, so nothing would restart it: '
            f'still waiting (watchdog.{phase}_s sets the limit)', file=sys.stderr, flush=True)
      return
    message = f'hang: {stalled}; exiting {HANG_EXIT}'
    events_lib.record_exit(HANG_EXIT, 'hang', message, phase=phase, step=self._last_step,
                           waited_s=waited, limit_s=limit)
    print(f'brainscale: {message}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    for child in multiprocessing.active_children():   # os._exit leaves them running
      child.kill()
    os._exit(HANG_EXIT)

  def close(self):
    """Stops watching (the run ended, or is leaving through an error)."""
    self._stopped.set()


_current: Watchdog | None = None


def disarm():
  """Stops the watchdog of this process, if any (before a deliberate exit)."""
  if _current is not None:
    _current.close()
