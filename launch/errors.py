"""The error funnel of brainscale's CLIs (launch/run.py, launch/predict.py).

An expected failure (a bad config value, input file or workdir; a checkpoint that
cannot be written) is one line on stderr, `brainscale: ...`, with its exit code;
anything else is a bug and keeps its traceback. Either way the exit and its cause go to
the run's events (brainscale/train/events.py), which the sbatch script's campaign policy
reads (launch/campaign.py).
"""

import contextlib
import logging as std_logging
import sys

from absl import logging


def fail(message: str, code: int = 2):
  print(f'brainscale: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


PEER_LOST_EXIT = 69   # EX_UNAVAILABLE: a collective or JAX's coordination service lost a peer

# What a JAX runtime error says when another process or the network is gone (a restart cures
# it), as opposed to the run's own fault (out of memory, a bad program).
_PEER_LOST = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'ABORTED', 'Gloo', 'gloo', 'coordination',
              'heartbeat', 'Connection', 'connection', 'NCCL', 'peer')


def _peer_lost(error: Exception) -> bool:
  import jax  # noqa: PLC0415  (already imported by a run that failed this way)
  return (isinstance(error, jax.errors.JaxRuntimeError) and jax.process_count() > 1
          and 'RESOURCE_EXHAUSTED' not in str(error)
          and any(word in str(error) for word in _PEER_LOST))


def exit_code(error: Exception) -> int | None:
  """The exit status of an expected failure; None for a bug (it keeps its traceback)."""
  from brainscale import config as config_lib  # noqa: PLC0415  (JAX only once something failed)
  from brainscale.data.importers import InputError  # noqa: PLC0415
  from brainscale.train import checkpoint, loop, preemption  # noqa: PLC0415
  if isinstance(error, preemption.Preempted):
    return preemption.REQUEUE_EXIT
  if isinstance(error, checkpoint.CheckpointError):
    return checkpoint.SAVE_FAILED_EXIT
  if isinstance(error, loop.NonFiniteError):
    return 1
  if isinstance(error, (config_lib.ConfigError, InputError, OSError)):
    return 2
  if 'jax' in sys.modules and _peer_lost(error):
    return PEER_LOST_EXIT
  return None


CAUSES = {0: 'done', 1: 'failed', 2: 'input', 74: 'checkpoint', 75: 'preempted',
          PEER_LOST_EXIT: 'peer_lost'}


def record_exit(code: int, error: Exception | None = None):
  """Records this process's exit in the run's events and stops its hang watchdog."""
  from brainscale.train import events, watchdog  # noqa: PLC0415
  watchdog.disarm()
  cause = CAUSES.get(code, 'failed')
  if code == 1 and error is not None:   # exit 1: a non-finite loss, or a bug
    cause = 'nonfinite' if type(error).__name__ == 'NonFiniteError' else 'bug'
  text = '' if error is None else f'{type(error).__name__}: {message(error)}'
  events.record_exit(code, cause, text)


def message(error: Exception) -> str:
  """One line: an OSError names its file; others say what they say."""
  if isinstance(error, OSError) and error.filename:
    return f'{error.strerror or type(error).__name__}: {error.filename}'
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


class FirstLine(std_logging.Filter):
  """Orbax and Grain log a failure with its traceback before it reaches us; keep one line."""

  def filter(self, record):
    record.msg = (record.getMessage().splitlines() or [''])[0]
    record.args, record.exc_info, record.exc_text = (), None, None
    return True


def quiet_logs(traceback: bool):
  """Warnings and worse only, each in one line unless --traceback."""
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every file at INFO
  if not traceback:
    logging.get_absl_handler().addFilter(FirstLine())


def _leaving(error: Exception) -> Exception:
  """A run leaving on `error`: a failed write (a full disk) first lets the checkpoint save in
  flight finish, whose failure is then the error reported (as save() would have raised it:
  step, folder, its temporary folder removed); the metric writers are closed quietly, so
  none flushes into a full disk at exit."""
  if 'brainscale.train.checkpoint' not in sys.modules:
    return error
  from brainscale.train import checkpoint, report  # noqa: PLC0415
  if isinstance(error, (OSError, checkpoint.CheckpointError)):
    failed = checkpoint.finish_saves()
    error = failed if failed is not None and not isinstance(
        error, checkpoint.CheckpointError) else error
  report.close_writers()
  return error


@contextlib.contextmanager
def funnel(traceback: bool):
  """An expected failure inside becomes `fail(message, exit_code)`; --traceback re-raises it."""
  try:
    yield
  except Exception as e:
    e = _leaving(e)
    code = exit_code(e)
    record_exit(1 if code is None else code, e)
    if code is None or traceback:
      raise
    fail(message(e), code=code)
  record_exit(0)
