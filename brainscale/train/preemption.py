"""SIGTERM as a preemption notice: every process agrees on one step to checkpoint and stop at.

SLURM sends SIGTERM before it kills a job (`--signal=TERM@grace`, a preemption,
`scontrol requeue`, `scancel --signal=TERM`). In a multi-process run JAX's
preemption sync manager (started by jax.distributed.initialize) catches it on
whichever process got it and agrees with all the others on the next step they
can all reach; `reached(step)` is true at that step on every process and false
elsewhere, so the collective checkpoint starts everywhere at once. It must be
asked at every step. A single process catches SIGTERM itself.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils

REQUEUE_EXIT = 75   # the process saved a checkpoint after a preemption notice: requeue it


class Preempted(Exception):
  """Training stopped at an agreed step after SIGTERM; the checkpoint of that step is saved."""

  def __init__(self, step: int):
    super().__init__(f'preempted: checkpoint of step {step} saved; exiting with '
                     f'{REQUEUE_EXIT} so that the job is requeued')
    self.step = step


class Notice:
  """Whether SIGTERM arrived, agreed across processes (use as a context manager)."""

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self.signalled = False
    self._previous = None

  def __enter__(self):
    # Multi-process: JAX's C++ notifier owns SIGTERM; a Python handler would displace it.
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    """True at the step where every process stops (call at every step, on every process)."""
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled
