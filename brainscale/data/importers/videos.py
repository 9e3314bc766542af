"""A folder of video files (anything FFmpeg reads) → ArrayRecord shards of short H.264 clips.

  python -m brainscale.data.importers.videos SOURCE OUT [--clip_seconds 10] [--workers 8]
  python -m brainscale.data.importers.videos SOURCE OUT --part=I/N   (then --merge)
  python launch/import_array.py videos SOURCE OUT --parts=N   (the same as a SLURM job array)

Each readable video is resized (short side ≤ max_side, even sides), split into
clips of ≤ clip_seconds and re-encoded in memory with a short GOP (importers/video_clips.py);
one record per clip (see brainscale.data.video). X.flow.npy + X.json ("flow_gap_frames") next
to X.mp4 add ground-truth flow. Unreadable files are skipped and reported.
OUT is written atomically: shards, index.json and report.json appear together.
In parts (importers/parts.py: resumable, a killed part redone alone, files added later
imported alone) each part's shards stay in OUT/parts/ and the merge writes the index a
one-machine import would, clip for clip, each clip naming its shard and record.
Frames are stored as players show them: a display matrix (phone video's rotation) is applied.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time

from array_record.python.array_record_module import ArrayRecordWriter

from brainscale.data import video as video_lib
from brainscale.data.importers import InputError, failed, video_clips
from brainscale.data.importers import parts as parts_lib

VIDEO_SUFFIXES = frozenset({'.mp4', '.m4v', '.mov', '.webm', '.mkv', '.avi', '.mpg', '.mpeg',
                            '.ts', '.mts', '.m2ts', '.flv', '.wmv', '.ogv', '.3gp', '.3g2'})


@dataclasses.dataclass
class Report:
  """What an import kept (one entry per video) and what it skipped, with the reason."""
  imported: list[dict] = dataclasses.field(default_factory=list)
  skipped: list[dict] = dataclasses.field(default_factory=list)
  ignored_files: int = 0   # files without a video suffix (sidecars, notes, ...)

  def summary(self) -> str:
    clips = sum(v['clips'] for v in self.imported)
    notes = sum(1 for v in self.imported if v.get('note'))
    return (f'imported {len(self.imported)} videos as {clips} clips, skipped {len(self.skipped)} '
            f'files, {notes} imported with a note, ignored {self.ignored_files} non-video files')


def _results(jobs: list[tuple], workers: int):
  """(job id, entry, reason) per job as they finish: in this process, or a spawn pool."""
  if workers <= 1:
    yield from map(video_clips._import_file, jobs)
    return
  with multiprocessing.get_context('spawn').Pool(workers) as pool:
    yield from pool.imap_unordered(video_clips._import_file, jobs, chunksize=1)


class _Shards:
  """Writes records into shards of records_per_shard; names them -of-N once N is known."""

  def __init__(self, directory: pathlib.Path, records_per_shard: int):
    self.directory, self.records_per_shard = directory, records_per_shard
    self.writer, self.counts = None, []

  def write(self, record: bytes) -> int:
    """Appends the record; returns its shard's number."""
    if self.writer is None or self.counts[-1] == self.records_per_shard:
      self.close_current()
      self.writer = ArrayRecordWriter(str(self.directory / f'shard-{len(self.counts):05d}.partial'),
                                      'group_size:1')
      self.counts.append(0)
    self.writer.write(record)
    self.counts[-1] += 1
    return len(self.counts) - 1

  def close_current(self):
    if self.writer is not None:
      self.writer.close()
      self.writer = None

  def finish(self) -> list[dict]:
    """Closes and renames the shards; [{name, records}] in order."""
    self.close_current()
    shards = []
    for k, count in enumerate(self.counts):
      name = f'shard-{k:05d}-of-{len(self.counts):05d}.array_record'
      (self.directory / f'shard-{k:05d}.partial').rename(self.directory / name)
      shards.append({'name': name, 'records': count})
    return shards


class _Progress:
  """One line on stderr: bar, files done / total, clips, skipped, files/s; ≤ 10 redraws/s."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled, self.start, self.drawn = total, enabled, time.monotonic(), 0.0

  def update(self, done: int, clips: int, skipped: int, final: bool = False):
    now = time.monotonic()
    if not self.enabled or (not final and now - self.drawn < 0.1):
      return
    self.drawn, rate = now, done / max(now - self.start, 1e-9)
    filled = 20 * done // max(self.total, 1)
    bar = '#' * filled + '.' * (20 - filled)
    eta = f'{(self.total - done) / rate:.0f}s' if rate else '?'
    sys.stderr.write(f'\rimport videos [{bar}] {done}/{self.total} files  {clips} clips  '
                     f'{skipped} skipped  {rate:.1f} files/s  eta {eta}   ')
    sys.stderr.write('\n' if final else '')
    sys.stderr.flush()


def _check_out_dir(out_dir: pathlib.Path, overwrite: bool):
  """Raises unless out_dir is absent, empty, or (with overwrite) an earlier import."""
  if not out_dir.exists():
    return
  if (out_dir / 'index.json').is_file():
    if not overwrite:
      raise InputError(f'{out_dir} already holds imported videos (index.json); '
                       'pass overwrite=True (--overwrite) to import again')
  elif not out_dir.is_dir() or any(out_dir.iterdir()):
    raise InputError(f'{out_dir} exists and is not an imported video folder; '
                     'choose another OUT')


def import_videos(source_dir, out_dir, *, clip_seconds: float = 10.0, max_side: int = 320,
                  records_per_shard: int = 256, workers: int = 1, crf: int = 18, gop: int = 8,
                  progress: bool = True, overwrite: bool = False) -> Report:
  """Imports every readable video under source_dir into out_dir; returns (and writes) the report.

  Clips are ordered by source path (relative, POSIX) then clip number, so the
  shards are byte-identical for any number of workers (workers > 1 spawns
  processes: call it under `if __name__ == '__main__'`). out_dir appears only
  when complete; an existing import there is an error unless overwrite=True.
  """
  source_dir, out_dir = pathlib.Path(source_dir), pathlib.Path(out_dir)
  if not source_dir.is_dir():
    raise InputError(f'video source {source_dir} is not a folder; expected a folder of videos')
  _check_out_dir(out_dir, overwrite)
  files = sorted((p for p in source_dir.rglob('*') if p.is_file()),
                 key=lambda p: p.relative_to(source_dir).as_posix())
  videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
  report = Report(ignored_files=len(files) - len(videos))
  options = video_clips._Options(clip_seconds=clip_seconds, max_side=max_side, crf=crf, gop=gop)
  staging = out_dir.parent / f'.{out_dir.name}.importing-{os.getpid()}'
  shutil.rmtree(staging, ignore_errors=True)
  (staging / 'parts').mkdir(parents=True)
  try:
    jobs = [(i, str(p), p.relative_to(source_dir).as_posix(), str(staging / 'parts' / f'{i:08d}'),
             options) for i, p in enumerate(videos)]
    index = _write_shards(staging, jobs, report, records_per_shard, workers,
                          _Progress(len(jobs), progress))
    if not index['clips']:
      raise InputError(f'no readable video in {source_dir}: {report.summary()}')
    index.update(videos=len(report.imported), options=dataclasses.asdict(options))
    shutil.rmtree(staging / 'parts')
    (staging / 'report.json').write_text(json.dumps(dataclasses.asdict(report), indent=1))
    (staging / 'index.json').write_text(json.dumps(index, indent=1))
    _swap_in(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return report


def _write_shards(staging: pathlib.Path, jobs: list[tuple], report: Report,
                  records_per_shard: int, workers: int, bar) -> dict:
  """Runs the jobs and merges their parts into shards in job order; returns the index."""
  shards = _Shards(staging, records_per_shard)
  finished, merged, clips = {}, 0, []
  for done, (i, entry, reason) in enumerate(_results(jobs, workers), 1):
    finished[i] = (entry, reason)
    while merged in finished:
      entry, reason = finished.pop(merged)
      part = pathlib.Path(jobs[merged][3])
      if entry is None:
        report.skipped.append({'path': jobs[merged][2], 'reason': reason})
      else:
        report.imported.append(entry)
        for record in video_clips._read_part(part):
          clips.append(_index_entry(video_lib.decode_header(record), shards.write(record)))
      part.unlink()
      merged += 1
    bar.update(done, len(clips), len(report.skipped), final=done == len(jobs))
  return {'format': video_lib.MAGIC.decode(), 'clips': clips, 'records': len(clips),
          'shards': shards.finish()}


def _index_entry(header: dict, shard: int) -> dict:
  """A clip's line in index.json."""
  keys = ('source', 'clip', 'start_s', 'fps', 'frames', 'width', 'height')
  return {'shard': shard, **{k: header[k] for k in keys},
          'duration_s': header['frames'] / header['fps'], 'has_flow': 'flow_gap_frames' in header}


def _swap_in(staging: pathlib.Path, out_dir: pathlib.Path):
  """Renames the finished staging folder to out_dir, replacing an earlier one."""
  old = out_dir.parent / f'.{out_dir.name}.replaced-{os.getpid()}'
  if out_dir.exists():
    out_dir.rename(old)
  staging.rename(out_dir)
  shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- in parts (a SLURM job array)

def _listing(source_dir: pathlib.Path) -> tuple[list[str], int]:
  """(names of the videos under source_dir, relative POSIX paths, sorted; other files)."""
  if not source_dir.is_dir():
    raise InputError(f'video source {source_dir} is not a folder; expected a folder of videos')
  names = sorted(p.relative_to(source_dir).as_posix() for p in source_dir.rglob('*') if p.is_file())
  videos = [n for n in names if pathlib.PurePosixPath(n).suffix.lower() in VIDEO_SUFFIXES]
  return videos, len(names) - len(videos)


def plan(source_dir, out_dir, *, parts: int, clip_seconds: float = 10.0, max_side: int = 320,
         records_per_shard: int = 256, crf: int = 18, gop: int = 8,
         generation: int | None = None) -> parts_lib.Generation | None:
  """The generation of parts to import next (see parts.py); None when nothing is new."""
  source_dir, out_dir = pathlib.Path(source_dir), pathlib.Path(out_dir)
  if (out_dir / 'index.json').is_file() and not parts_lib.parts_dir(out_dir).is_dir():
    raise InputError(f'{out_dir} holds a one-machine import (index.json, no parts/); '
                     'import in parts into another OUT')
  names, ignored = _listing(source_dir)
  options = video_clips._Options(clip_seconds=clip_seconds, max_side=max_side, crf=crf, gop=gop)
  settings = json.loads(json.dumps({**dataclasses.asdict(options),
                                    'records_per_shard': records_per_shard}))
  return parts_lib.current(out_dir, names, parts=parts, options=settings, ignored=ignored,
                           number=generation)


def import_part(source_dir, out_dir, *, part: tuple[int, int], generation: int | None = None,
                workers: int = 1, progress: bool = True, **settings) -> Report | None:
  """Imports part i of n (part=(i, n)) of the next generation into OUT/parts/; its report,
  or None when the part was already done or nothing is new. Settings as import_videos'."""
  source_dir, out_dir = pathlib.Path(source_dir), pathlib.Path(out_dir)
  i, n = part
  todo = plan(source_dir, out_dir, parts=n, generation=generation, **settings)
  if todo is None:
    print(f'nothing new in {source_dir}: every video is in a part of {out_dir}', file=sys.stderr)
    return None
  label = f'import videos g{todo.number:04d} part {i}/{n}'
  names, report = todo.names_of(i), Report()
  fields = dataclasses.fields(video_clips._Options)
  options = video_clips._Options(**{f.name: todo.options[f.name] for f in fields})
  bar = parts_lib.LogProgress(label, len(names), enabled=progress)

  def fill(folder: pathlib.Path):
    (folder / 'files').mkdir()
    jobs = [(k, str(source_dir / name), name, str(folder / 'files' / f'{k:08d}'), options)
            for k, name in enumerate(names)]
    index = _write_shards(folder, jobs, report, todo.options['records_per_shard'], workers, bar)
    if not names:
      bar.update(0, 0, 0, final=True)
    (folder / 'files').rmdir()
    (folder / 'report.json').write_text(json.dumps(dataclasses.asdict(report), indent=1))
    (folder / 'index.json').write_text(json.dumps(index, indent=1))

  if not parts_lib.build(out_dir, todo, i, fill):
    print(f'{label}: already done ({todo.folder(out_dir, i).name})', file=sys.stderr)
    return None
  return report


def merge(out_dir) -> Report:
  """Writes OUT/index.json and OUT/report.json from every part, atomically; the report.

  The index is the one a one-machine import of the same files writes, clip for clip
  (ordered by source path, then clip number); each clip also names its record within
  its shard, since the parts' shards hold the clips in another order.
  """
  out_dir = pathlib.Path(out_dir)
  plans = parts_lib.to_merge(out_dir)
  report, shards, clips = Report(ignored_files=plans[-1].ignored), [], []
  for g in plans:
    for i in range(g.parts):
      folder = g.folder(out_dir, i)
      part_report = json.loads((folder / 'report.json').read_text())
      report.imported += part_report['imported']
      report.skipped += part_report['skipped']
      part_index, first = json.loads((folder / 'index.json').read_text()), len(shards)
      shards += [{**s, 'name': f'parts/{folder.name}/{s["name"]}'} for s in part_index['shards']]
      records = [0] * len(part_index['shards'])
      for clip in part_index['clips']:
        clips.append({**clip, 'shard': first + clip['shard'], 'record': records[clip['shard']]})
        records[clip['shard']] += 1
  if not clips:
    raise InputError(f'no readable video in the parts of {out_dir}: {report.summary()}')
  clips.sort(key=lambda c: (c['source'], c['clip']))
  report.imported.sort(key=lambda v: v['path'])
  report.skipped.sort(key=lambda v: v['path'])
  options = {f.name: plans[0].options[f.name] for f in dataclasses.fields(video_clips._Options)}
  index = {'format': video_lib.MAGIC.decode(), 'clips': clips, 'records': len(clips),
           'shards': shards, 'videos': len(report.imported), 'options': options}
  parts_lib.write_atomically(out_dir / 'report.json', json.dumps(dataclasses.asdict(report),
                                                                 indent=1))
  parts_lib.write_atomically(out_dir / 'index.json', json.dumps(index, indent=1))
  return report


def _merged(out_dir: pathlib.Path, start: float) -> str:
  """What a merge did, in one line."""
  report = merge(out_dir)
  plans = parts_lib.generations(out_dir)
  skipped = f' ({parts_lib.reasons(report.skipped)})' if report.skipped else ''
  return (f'merged {sum(g.parts for g in plans)} parts ({len(plans)} generation(s)) in '
          f'{time.monotonic() - start:.2f} s: {report.summary()}{skipped}; '
          f'see {out_dir / "report.json"}')


SETTINGS = ('clip_seconds', 'max_side', 'records_per_shard', 'crf', 'gop')   # fixed per OUT


def parser() -> argparse.ArgumentParser:
  """The command line (launch/import_array.py reads the same one to plan a job array)."""
  parser = argparse.ArgumentParser(prog='python -m brainscale.data.importers.videos',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('source', metavar='SOURCE', help='folder of videos (searched recursively)')
  parser.add_argument('out', metavar='OUT', help='folder to create: shards, index, report')
  parser.add_argument('--clip_seconds', type=float, default=10.0)
  parser.add_argument('--max_side', type=int, default=320, help='largest short side; 0: keep')
  parser.add_argument('--records_per_shard', type=int, default=256)
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
  parser.add_argument('--crf', type=int, default=18)
  parser.add_argument('--gop', type=int, default=8)
  parser.add_argument('--overwrite', action='store_true', help='replace an earlier import in OUT')
  parser.add_argument('--quiet', action='store_true', help='no progress bar')
  parser.add_argument('--part', metavar='I/N', type=parts_lib.part_flag,
                      help='import part I of N into OUT/parts/ (resumable; see parts.py); '
                      'the task that completes the last part merges')
  parser.add_argument('--generation', type=int, help='with --part: the generation to work on')
  parser.add_argument('--merge', action='store_true',
                      help='write OUT/index.json and report.json from every part')
  return parser


def settings(args: argparse.Namespace) -> dict:
  """The import's settings from its command line."""
  return {key: getattr(args, key) for key in SETTINGS}


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  try:
    if args.part or args.merge:
      return _main_in_parts(args)
    report = import_videos(args.source, args.out, workers=args.workers, progress=not args.quiet,
                           overwrite=args.overwrite, **settings(args))
  except (InputError, OSError) as e:
    return failed(e)
  for skipped in report.skipped:
    print(f'skipped {skipped["path"]}: {skipped["reason"]}', file=sys.stderr)
  print(f'brainscale: {report.summary()}; see {pathlib.Path(args.out) / "report.json"}')
  return 0


def _main_in_parts(args: argparse.Namespace) -> int:
  """--part=i/n: import one part (and merge if it was the last); --merge: merge."""
  out, start = pathlib.Path(args.out), time.monotonic()
  if args.part:
    report = import_part(args.source, out, part=args.part, generation=args.generation,
                         workers=args.workers, progress=not args.quiet, **settings(args))
    if report is not None:
      clips = sum(v['clips'] for v in report.imported)
      skipped = f' ({parts_lib.reasons(report.skipped)})' if report.skipped else ''
      print(f'brainscale: part {args.part[0]}/{args.part[1]}: imported {len(report.imported)} '
            f'videos as {clips} clips, skipped {len(report.skipped)} files{skipped}')
    if not args.merge and parts_lib.missing(out):
      return 0
  print(f'brainscale: {_merged(out, time.monotonic() if args.part else start)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
