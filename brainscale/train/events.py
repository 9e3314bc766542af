"""An append-only record of what each process of a run did and when, across all its attempts.

Every process appends one JSON line per event to WORKDIR/events/ATTEMPT-RANK.jsonl
(`{"t": unix time, "event": name, ...}`): start, restore, compile, each step, save,
eval, and its exit with the cause; the sbatch script adds the job's own start and end
(BATCH). The campaign policy (launch/campaign.py) reads a finished attempt's exits,
train/goodput.py the whole run's time. Writing never stops training: a full disk
only loses events. Imports no JAX.
"""

import contextlib
import json
import os
import pathlib
import socket
import time

FOLDER = 'events'
BATCH = 'batch'   # the rank name of the sbatch script's own events


def attempt() -> str:
  """This attempt's name: SLURM job.restart, or host-pid outside SLURM."""
  if 'SLURM_JOB_ID' in os.environ:
    return f'{os.environ["SLURM_JOB_ID"]}.{os.environ.get("SLURM_RESTART_COUNT", "0")}'
  return f'{socket.gethostname()}-{os.getpid()}'


def where() -> dict:
  """The fields that say which process this is and where it runs."""
  env = os.environ
  return dict(rank=int(env.get('SLURM_PROCID', 0)), node=env.get('SLURMD_NODENAME', ''),
              host=socket.gethostname(), pid=os.getpid(), job=env.get('SLURM_JOB_ID', ''),
              restart=int(env.get('SLURM_RESTART_COUNT', 0)),
              run=env.get('BRAINSCALE_RUN_ID', ''), attempt=int(env.get('BRAINSCALE_ATTEMPT', 0)))


class Events:
  """The event file of one process in one attempt; `record` appends one line."""

  def __init__(self, workdir: str, rank: int | str | None = None):
    rank = where()['rank'] if rank is None else rank
    self.path = pathlib.Path(workdir) / FOLDER / f'{attempt()}-{rank}.jsonl'
    self._fd = None
    with contextlib.suppress(OSError):
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def record(self, event: str, **fields) -> float:
    """Appends the event (one write, so a line is never split); returns its time."""
    now = time.time()
    if self._fd is not None:
      line = json.dumps({'t': now, 'event': event, **fields}) + '\n'
      with contextlib.suppress(OSError):
        os.write(self._fd, line.encode())
    return now

  @contextlib.contextmanager
  def span(self, event: str, **fields):
    """Records `event` when the block ends, with its start `t0`."""
    t0 = time.time()
    yield
    self.record(event, t0=t0, **fields)

  def close(self):
    if self._fd is not None:
      with contextlib.suppress(OSError):
        os.close(self._fd)
      self._fd = None


_current: Events | None = None


def open_for(workdir: str) -> Events:
  """This process's event file in `workdir`, with its start event; later calls of
  `record_exit` write there."""
  global _current
  if _current is not None:
    _current.close()
  _current = Events(workdir)
  _current.record('start', **where())
  return _current


def record_exit(code: int, cause: str, message: str = '', **fields):
  """The exit of this process (the CLI's error funnel and the hang watchdog call it)."""
  if _current is not None:
    _current.record('exit', code=code, cause=cause, message=message[:500], **fields)


def read(path) -> list[dict]:
  """The events of one file; a line cut short by a crash is skipped."""
  out = []
  with open(path) as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):
        event = json.loads(line)
        if isinstance(event, dict) and 't' in event:
          out.append(event)
  return out


def by_attempt(workdir) -> dict[str, dict[str, list[dict]]]:
  """{attempt: {rank: events}} of every event file in WORKDIR/events."""
  out = {}
  for path in sorted((pathlib.Path(workdir) / FOLDER).glob('*.jsonl')):
    name, _, rank = path.stem.rpartition('-')
    out.setdefault(name, {})[rank] = read(path)
  return out
