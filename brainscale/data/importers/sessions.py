"""Many neural sessions (a folder of NWB files, or of Sensorium mouse folders) → one store,
imported in parts that many machines run apart (importers/parts.py), then merged.

  python -m brainscale.data.importers.sessions FOLDER ROOT --format=nwb --part=I/N
  python -m brainscale.data.importers.sessions FOLDER ROOT --format=nwb --merge
  python launch/import_array.py sessions FOLDER ROOT --format=nwb --parts=N

Part I imports its sessions (nwb.import_nwb, sensorium.import_sensorium) into a store of
its own, ROOT/parts/gGGGG-pIIIII-of-NNNNN/; a session that fails is a counted skip with its
reason. The merge links (hard links: no data copied) every session into ROOT and writes
ROOT/catalog.json as importing them one by one in name order, generation after generation,
would: the same global neuron table, so a later generation only appends neurons.
"""

import argparse
import json
import os
import pathlib
import sys
import time

from brainscale.data import neural
from brainscale.data.importers import InputError, failed, nwb, sensorium
from brainscale.data.importers import parts as parts_lib
from brainscale.data.neural import write as neural_write

SETTINGS = ('format', 'rate', 'frame_shape', 'missing_behavior')   # fixed per ROOT


def _inputs(folder: pathlib.Path, format_: str) -> tuple[list[str], int]:
  """(the sessions' names relative to folder, sorted; other entries): *.nwb files, or mouse
  folders (holding data/ and meta/)."""
  if not folder.is_dir():
    raise InputError(f'session source {folder} is not a folder; expected a folder of '
                     f'{"NWB files" if format_ == "nwb" else "Sensorium mouse folders"}')
  if format_ == 'nwb':
    entries = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())
    names = [n for n in entries if n.endswith('.nwb')]
  else:
    entries = sorted(p.name for p in folder.iterdir())
    names = [n for n in entries if all((folder / n / sub).is_dir() for sub in ('data', 'meta'))]
  return names, len(entries) - len(names)


def plan(source, root, *, parts: int, generation: int | None = None, **settings):
  """The generation of parts to import next; None when every session is in one."""
  if (pathlib.Path(root) / neural.CATALOG).is_file() and not parts_lib.parts_dir(root).is_dir():
    raise InputError(f'{root} is a store made session by session (catalog.json, no parts/); '
                     'import in parts into another ROOT')
  names, ignored = _inputs(pathlib.Path(source), settings['format'])
  return parts_lib.current(root, names, parts=parts, options=json.loads(json.dumps(settings)),
                           ignored=ignored, number=generation)


def _import_one(path: pathlib.Path, store: pathlib.Path, options: dict) -> str:
  """Imports one session into store; its name."""
  if options['format'] == 'nwb':
    return nwb.import_nwb(path, store, rate=options['rate'],
                          frame_shape=nwb._frame_shape(options['frame_shape']),
                          missing_behavior=options['missing_behavior'], progress=False)
  return sensorium.import_sensorium(path, store, rate=options['rate'], progress=False)


def import_part(source, root, *, part: tuple[int, int], generation: int | None = None,
                progress: bool = True, **settings) -> dict | None:
  """Imports part i of n (part=(i, n)) into ROOT/parts/; its report ({imported: [{path,
  session}], skipped: [{path, reason}]}), or None when done already or nothing is new."""
  source, root = pathlib.Path(source), pathlib.Path(root)
  todo = plan(source, root, parts=part[1], generation=generation, **settings)
  if todo is None:
    print(f'nothing new in {source}: every session is in a part of {root}', file=sys.stderr)
    return None
  names, report = todo.names_of(part[0]), {'imported': [], 'skipped': []}
  bar = parts_lib.LogProgress(f'import sessions g{todo.number:04d} part {part[0]}/{part[1]}',
                              len(names), enabled=progress, units=('sessions', 'imported'))

  def fill(folder: pathlib.Path):
    for done, name in enumerate(names, 1):
      try:
        session = _import_one(source / name, folder, todo.options)
        report['imported'].append({'path': name, 'session': session})
      except (InputError, OSError) as e:   # a bad session is skipped, never fatal
        report['skipped'].append({'path': name, 'reason': ' '.join(str(e).split())})
      bar.update(done, len(report['imported']), len(report['skipped']), final=done == len(names))
    (folder / 'report.json').write_text(json.dumps(report, indent=1))

  if not parts_lib.build(root, todo, part[0], fill):
    print(f'part {part[0]}/{part[1]} of generation {todo.number}: already done', file=sys.stderr)
    return None
  return report


def _link_tree(source: pathlib.Path, target: pathlib.Path):
  """target: a copy of the folder source made of hard links (meta.json left out)."""
  for path in sorted(source.rglob('*')):
    if path.is_dir():
      (target / path.relative_to(source)).mkdir(parents=True)
    elif path.relative_to(source).as_posix() != 'meta.json':
      os.link(path, target / path.relative_to(source))


def _place(root: pathlib.Path, part_store: pathlib.Path, name: str, meta: dict):
  """ROOT/name: the part's session (linked), with this meta.json."""
  final, text = root / name, json.dumps(meta)
  ours, probe = part_store / name / 'responses' / 'zarr.json', final / 'responses' / 'zarr.json'
  if final.exists():
    if not (probe.exists() and os.path.samefile(probe, ours)):
      raise InputError(f'{final} exists and is not a session of this import\'s parts; '
                       'merge into a store of its own')
    parts_lib.write_atomically(final / 'meta.json', text)
    return
  temp = root / f'.{name}.merging-{os.getpid()}'
  _link_tree(part_store / name, temp)
  (temp / 'meta.json').write_text(text)
  temp.rename(final)


def merge(root) -> dict:
  """Links every session of every part into ROOT and writes its catalog.json; the report."""
  root = pathlib.Path(root)
  plans = parts_lib.to_merge(root)
  catalog, report = None, {'imported': [], 'skipped': [], 'ignored_files': plans[-1].ignored}
  for g in plans:
    found = {}   # input name → (part store, its report entry)
    for i in range(g.parts):
      part_report = json.loads((g.folder(root, i) / 'report.json').read_text())
      report['skipped'] += part_report['skipped']
      found.update({e['path']: (g.folder(root, i), e) for e in part_report['imported']})
    for path in sorted(found):
      store, entry = found[path]
      name, part_catalog = entry['session'], json.loads((store / neural.CATALOG).read_text())
      if catalog is None:
        catalog = neural_write._new_catalog(part_catalog['rate'], part_catalog['frame_shape'])
      if name in [s['name'] for s in catalog['sessions']]:
        raise InputError(f'two inputs are session {name!r} ({path} and another); rename one')
      summary = next(s for s in part_catalog['sessions'] if s['name'] == name)
      meta = json.loads((store / name / 'meta.json').read_text())
      catalog, neuron_index = neural_write._catalog_with(catalog, name, meta['animal'],
                                                   meta['unit_ids'], summary['samples'],
                                                   summary['trials'])
      _place(root, store, name, {**meta, 'neuron_index': neuron_index.tolist()})
      report['imported'].append(entry)
  report['skipped'].sort(key=lambda e: e['path'])
  if catalog is None:
    raise InputError(f'no session of {root}\'s parts imported: '
                     f'{parts_lib.reasons(report["skipped"])}')
  neural_write._write_catalog(root, catalog)
  parts_lib.write_atomically(root / 'report.json', json.dumps(report, indent=1))
  return report


def parser() -> argparse.ArgumentParser:
  """The command line (launch/import_array.py reads the same one to plan a job array)."""
  parser = argparse.ArgumentParser(prog='python -m brainscale.data.importers.sessions',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('source', metavar='FOLDER', help='NWB files, or Sensorium mouse folders')
  parser.add_argument('out', metavar='ROOT', help='the neural store to make')
  parser.add_argument('--format', choices=('nwb', 'sensorium'), required=True)
  parser.add_argument('--rate', type=float, default=30.0, help='neural samples per second')
  parser.add_argument('--frame_shape', type=nwb._frame_shape, default=(36, 64),
                      help='H,W (NWB stimulus frames)')
  parser.add_argument('--missing_behavior', choices=('error', 'nan'), default='error')
  parser.add_argument('--quiet', action='store_true', help='no progress')
  parser.add_argument('--part', metavar='I/N', type=parts_lib.part_flag,
                      help='import part I of N into ROOT/parts/; the last part merges')
  parser.add_argument('--generation', type=int, help='with --part: the generation to work on')
  parser.add_argument('--merge', action='store_true', help='link every part into ROOT')
  return parser


def settings(args: argparse.Namespace) -> dict:
  """The import's settings from its command line, as its flags spell them ('36,64')."""
  values = {key: getattr(args, key) for key in SETTINGS}
  return {**values, 'frame_shape': ','.join(str(v) for v in values['frame_shape'])}


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if not (args.part or args.merge):
    return failed(InputError('pass --part=I/N (one part) or --merge; one session at a time: '
                             f'python -m brainscale.data.importers.{args.format}'))
  root, start = pathlib.Path(args.out), time.monotonic()
  try:
    if args.part:
      report = import_part(args.source, root, part=args.part, generation=args.generation,
                           progress=not args.quiet, **settings(args))
      if report is not None:
        skipped = f' ({parts_lib.reasons(report["skipped"])})' if report['skipped'] else ''
        print(f'brainscale: part {args.part[0]}/{args.part[1]}: imported '
              f'{len(report["imported"])} sessions, skipped {len(report["skipped"])}{skipped}')
      if not args.merge and parts_lib.missing(root):
        return 0
      start = time.monotonic()
    report = merge(root)
  except (InputError, OSError) as e:
    return failed(e)
  skipped = f' ({parts_lib.reasons(report["skipped"])})' if report['skipped'] else ''
  print(f'brainscale: merged {sum(g.parts for g in parts_lib.generations(root))} parts in '
        f'{time.monotonic() - start:.2f} s: {len(report["imported"])} sessions in {root}, '
        f'skipped {len(report["skipped"])}{skipped}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
