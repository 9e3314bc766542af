"""Importers: turn data in its native layout into brainscale's shards and stores.

An input an importer cannot use (missing, truncated, corrupt, lacking a part) raises
InputError, one line that names the file; each importer's CLI prints it and exits 2.
"""

import contextlib
import sys


class InputError(ValueError):
  """An importer's input or target cannot be used; the message is one line naming it."""

  def __init__(self, message: str):
    super().__init__(' '.join(str(message).split()))


def failed(error: Exception) -> int:
  """Prints `brainscale: <error>` on stderr; the exit code of a CLI whose input failed."""
  print(f'brainscale: {" ".join(str(error).split())}', file=sys.stderr)
  return 2


@contextlib.contextmanager
def store_errors(source):
  """The neural store's refusals (name taken, other rate, invalid data) as InputErrors that
  name the source being imported."""
  try:
    yield
  except InputError:
    raise
  except ValueError as e:
    raise InputError(f'{source}: {e}') from None
