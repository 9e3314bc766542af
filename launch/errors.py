"""The error funnel of brainscale's CLIs (launch/run.py, launch/predict.py).

An expected failure (a bad config value, input file or workdir; a checkpoint that
cannot be written) is one line on stderr, `brainscale: ...`, with its exit code;
anything else is a bug and keeps its traceback.
"""

import contextlib
import logging as std_logging
import sys

from absl import logging


def fail(message: str, code: int = 2):
  print(f'brainscale: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


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
  return None


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


@contextlib.contextmanager
def funnel(traceback: bool):
  """An expected failure inside becomes `fail(message, exit_code)`; --traceback re-raises it."""
  try:
    yield
  except Exception as e:
    code = exit_code(e)
    if code is None or traceback:
      raise
    fail(message(e), code=code)
