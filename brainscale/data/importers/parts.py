"""An import split into parts that many machines (a SLURM job array) run apart, then merge.

Design. An import of SOURCE into OUT proceeds in *generations*. A generation is a
manifest, OUT/parts/gGGGG.json, written once (atomically, first writer wins): the
input names (relative POSIX paths) that no earlier generation lists, the number of
parts n, and the import's options. Name f belongs to part `part_of(f, n)`, a stable
hash (sha256) of its name, so any machine computes the same split with no exchange.
Part i of generation G is the folder OUT/parts/gGGGG-pIIIII-of-NNNNN, built in a temp
folder beside it and renamed when complete: it exists complete or not at all. So a
part killed mid-way is redone alone, a complete part is skipped, and nothing written
is rewritten. Files added to SOURCE later go into the next generation (planned once
every part of the last one is done), so a rerun imports only them; datasets grow by
appending immutable parts, as TFDS/ArrayRecord datasets are versioned, never edited.
A changed or deleted input is not noticed: a generation is a snapshot of names.
The merge reads every part's own index and report and writes the one index.json and
report.json of OUT atomically; the importer decides their content and order.
Why not name a part by the content of its file list? New files hash into every part, so
adding 1% more files to n parts would invalidate and redo nearly all n; a generation
redoes nothing. Assumes OUT is on a file system all tasks share, with atomic rename and
hard links.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable

from brainscale.data.importers import InputError

MANIFEST = re.compile(r'^g(\d{4})\.json$')


def part_of(name: str, parts: int) -> int:
  """The part (0 .. parts-1) of an input named `name` (its path relative to SOURCE)."""
  digest = hashlib.sha256(name.encode()).digest()
  return int.from_bytes(digest[:8], 'big') % parts


def parse_part(text: str) -> tuple[int, int]:
  """'i/n' → (i, n), with 0 <= i < n."""
  found = re.fullmatch(r'(\d+)/(\d+)', text.strip())
  if not found or not int(found.group(1)) < int(found.group(2)):
    raise InputError(f'--part={text} is not i/n with 0 <= i < n (e.g. --part=0/64)')
  return int(found.group(1)), int(found.group(2))


def part_flag(text: str) -> tuple[int, int]:
  """parse_part for argparse's type=, which then prints the reason."""
  try:
    return parse_part(text)
  except InputError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class Generation:
  """One planned round of an import: its inputs, split into `parts` by part_of."""
  number: int
  parts: int
  names: tuple[str, ...]   # sorted
  options: dict            # the importer's settings; every generation of OUT has the same
  ignored: int = 0         # inputs under SOURCE the importer does not take (e.g. notes.txt)

  def names_of(self, i: int) -> list[str]:
    return [name for name in self.names if part_of(name, self.parts) == i]

  def folder(self, out, i: int) -> pathlib.Path:
    return parts_dir(out) / f'g{self.number:04d}-p{i:05d}-of-{self.parts:05d}'

  def done(self, out, i: int) -> bool:
    return self.folder(out, i).is_dir()

  def missing(self, out) -> list[int]:
    return [i for i in range(self.parts) if not self.done(out, i)]


def parts_dir(out) -> pathlib.Path:
  return pathlib.Path(out) / 'parts'


def write_atomically(path: pathlib.Path, text: str):
  """path holds text, or its earlier content: never a half-written file."""
  temp = path.with_name(f'.{path.name}.tmp-{_owner()}')
  temp.write_text(text)
  os.replace(temp, path)


def _owner() -> str:
  """Who writes a temp file: host and pid, so that tasks on many nodes never collide."""
  return f'{socket.gethostname()}-{os.getpid()}'


def generations(out) -> list[Generation]:
  """Every generation planned in OUT, oldest first."""
  found = sorted(p for p in parts_dir(out).glob('g*.json') if MANIFEST.match(p.name))
  plans = []
  for path in found:
    raw = json.loads(path.read_text())
    plans.append(Generation(raw['number'], raw['parts'], tuple(raw['names']), raw['options'],
                            raw.get('ignored', 0)))
  return plans


def _create(out, plan: Generation) -> Generation:
  """Writes plan's manifest unless another task wrote one first; the one in OUT."""
  path = parts_dir(out) / f'g{plan.number:04d}.json'
  temp = path.with_name(f'.{path.name}.tmp-{_owner()}')
  temp.write_text(json.dumps(dataclasses.asdict(plan), indent=1))
  try:
    os.link(temp, path)   # fails if the manifest exists: the first writer wins
  except FileExistsError:
    pass
  finally:
    temp.unlink()
  return next(g for g in generations(out) if g.number == plan.number)


def current(out, names: Iterable[str], *, parts: int, options: dict, ignored: int = 0,
            number: int | None = None) -> Generation | None:
  """The generation to work on: `number` if given; else the last one while it has parts
  to do; else a new one of the names no generation lists (None when there are none)."""
  plans = generations(out)
  if plans and plans[0].options != options:
    raise InputError(f'{out} was imported with {_differences(plans[0].options, options)}; '
                     'import with the same settings, or into another OUT')
  if number is not None:
    found = [g for g in plans if g.number == number]
    if not found:
      raise InputError(f'--generation={number}: {parts_dir(out)} holds no g{number:04d}.json')
    return _same_parts(found[0], parts)
  if plans and plans[-1].missing(out):
    return _same_parts(plans[-1], parts)
  known = {name for g in plans for name in g.names}
  new = sorted(set(names) - known)
  if not new:
    return None
  parts_dir(out).mkdir(parents=True, exist_ok=True)
  number = plans[-1].number + 1 if plans else 1
  return _create(out, Generation(number, parts, tuple(new), options, ignored))


def _same_parts(plan: Generation, parts: int) -> Generation:
  if plan.parts != parts:
    raise InputError(f'generation {plan.number} of this import has {plan.parts} parts, not '
                     f'{parts}; finish it with --part=i/{plan.parts}')
  return plan


def _differences(old: dict, new: dict) -> str:
  return ', '.join(f'{k}={old.get(k)} (this run: {new.get(k)})'
                   for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def build(out, plan: Generation, i: int, fill: Callable[[pathlib.Path], None]) -> bool:
  """Runs fill(temp folder) and renames the folder to part i's; False if it was done."""
  final = plan.folder(out, i)
  if final.is_dir():
    return False
  for stale in final.parent.glob(f'.{final.name}.tmp-*'):   # a killed attempt's
    shutil.rmtree(stale, ignore_errors=True)
  temp = final.with_name(f'.{final.name}.tmp-{_owner()}')
  temp.mkdir(parents=True)
  try:
    fill(temp)
    temp.rename(final)
  except BaseException:
    shutil.rmtree(temp, ignore_errors=True)
    raise
  return True


def missing(out) -> list[str]:
  """The folder names of parts not done yet, over every generation."""
  return [g.folder(out, i).name for g in generations(out) for i in g.missing(out)]


def to_merge(out) -> list[Generation]:
  """The generations of OUT, once every part of them is done; else a one-line InputError."""
  plans = generations(out)
  if not plans:
    raise InputError(f'{out} holds no parts to merge; import with --part=i/n first')
  if todo := missing(out):
    raise InputError(f'{len(todo)} part(s) of {out} not done: {", ".join(todo[:4])}'
                     f'{" ..." if len(todo) > 4 else ""}; run them, then --merge')
  return plans


def reasons(skipped: list[dict]) -> str:
  """'3 × ValueError: empty file; 1 × ...': skip reasons with their counts, most first."""
  counts = {}
  for entry in skipped:
    counts[entry['reason']] = counts.get(entry['reason'], 0) + 1
  return '; '.join(f'{n} × {reason}' for reason, n in sorted(counts.items(), key=lambda x: -x[1]))


class LogProgress:
  """Progress as log lines (a SLURM log has no terminal): files done, files/s, ETA,
  at most one line per every_s seconds, and always the last."""

  def __init__(self, label: str, total: int, *, every_s: float = 10.0, enabled: bool = True,
               units: tuple[str, str] = ('files', 'clips')):
    self.label, self.total, self.every_s, self.enabled = label, total, every_s, enabled
    self.units = units   # what is counted, what it makes
    self.start = self.printed = time.monotonic()

  def update(self, done: int, clips: int, skipped: int, final: bool = False):
    """done of total inputs, making `clips` outputs, `skipped` of them skipped."""
    now = time.monotonic()
    if not self.enabled or (not final and now - self.printed < self.every_s):
      return
    self.printed, elapsed = now, max(now - self.start, 1e-9)
    rate = done / elapsed
    when = f'took {elapsed:.1f} s' if final else (
        f'eta {(self.total - done) / rate:.0f} s' if rate else 'eta ?')
    counted, made = self.units
    print(f'{self.label}: {done}/{self.total} {counted}, {clips} {made}, {skipped} skipped, '
          f'{rate:.2f} {counted}/s, {when}', file=sys.stderr, flush=True)
