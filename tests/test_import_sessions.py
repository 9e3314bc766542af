"""Many neural sessions imported in parts (importers/sessions.py) give the store that
importing them one by one in name order gives: the same catalog (global neuron table),
session metadata and array bytes; bad sessions are counted skips; sessions added later are
imported alone and appended. Sensorium folders and NWB files as tests/test_neural_importers.py
writes them.
"""

import json
import pathlib
import shlex
import sys

import numpy as np
import pytest

from brainscale.data import neural
from brainscale.data.importers import InputError, nwb, sensorium, sessions
from launch import import_array
from test_neural_importers import H, W, write_nwb, write_sensorium


def files_of(root: pathlib.Path, name: str) -> dict[str, bytes]:
  folder = root / name
  return {p.relative_to(folder).as_posix(): p.read_bytes()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def assert_same_store(got: pathlib.Path, expected: pathlib.Path):
  """The same catalog, and every session's files byte for byte."""
  assert json.loads((got / neural.CATALOG).read_text()) == json.loads(
      (expected / neural.CATALOG).read_text())
  for name in neural.Store(expected).session_names:
    assert files_of(got, name) == files_of(expected, name), name
  session = neural.Store(got).session(0)
  reference = neural.Store(expected).session(0)
  np.testing.assert_array_equal(session.read(0, 5)['responses'], reference.read(0, 5)['responses'])


def one_by_one(folder: pathlib.Path, root: pathlib.Path, names: list[str], importer) -> list[str]:
  """The sessions imported one at a time in this order; the names that failed."""
  failed = []
  for name in names:
    try:
      importer(folder / name, root)
    except InputError:
      failed.append(name)
  return failed


def test_sensorium_folders_in_parts_equal_one_by_one_and_new_ones_are_appended(tmp_path, rng):
  source, root, reference = tmp_path / 'src', tmp_path / 'store', tmp_path / 'reference'
  for name in ('mouse1-a', 'mouse1-b', 'mouse2-a', 'mouse3-a'):   # mouse1's share neurons
    write_sensorium(source / name, rng)
  write_sensorium(source / 'mouse4-broken', rng)
  (source / 'mouse4-broken' / 'meta/trials/tiers.npy').unlink()
  (source / 'README.txt').write_text('not a session\n')
  argv = [str(source), str(root), '--format=sensorium', '--quiet']
  for i in range(3):
    assert sessions.main([*argv, f'--part={i}/3']) == 0
  importer = lambda folder, store: sensorium.import_sensorium(folder, store, progress=False)
  names = ['mouse1-a', 'mouse1-b', 'mouse2-a', 'mouse3-a', 'mouse4-broken']
  assert one_by_one(source, reference, names, importer) == ['mouse4-broken']
  assert_same_store(root, reference)
  report = json.loads((root / 'report.json').read_text())
  assert [e['session'] for e in report['imported']] == names[:4]
  assert [e['path'] for e in report['skipped']] == ['mouse4-broken']
  assert 'tiers.npy is missing' in report['skipped'][0]['reason']
  assert report['ignored_files'] == 1

  part_files = {p: p.stat().st_mtime_ns for p in (root / 'parts').rglob('*') if p.is_file()}
  write_sensorium(source / 'mouse0-new', rng)   # sorts first: still appended after the others
  assert sessions.main([*argv, '--part=0/2']) == 0
  assert sessions.main([*argv, '--part=1/2']) == 0
  generation = json.loads((root / 'parts' / 'g0002.json').read_text())
  assert generation['names'] == ['mouse0-new'] and generation['parts'] == 2
  assert all(p.stat().st_mtime_ns == t for p, t in part_files.items())   # generation 1 untouched
  assert one_by_one(source, reference, ['mouse0-new'], importer) == []
  assert_same_store(root, reference)
  assert neural.Store(root).session_names[-1] == 'mouse0-new'


def test_nwb_files_in_parts_equal_one_by_one_and_the_merge_waits_for_every_part(
    tmp_path, rng, capsys):
  source, root, reference = tmp_path / 'src', tmp_path / 'store', tmp_path / 'reference'
  source.mkdir()
  for name in ('s1.nwb', 'lab/s2.nwb'):
    (source / name).parent.mkdir(exist_ok=True)
    write_nwb(source / name, rng)
  (source / 'bad.nwb').write_text('not HDF5\n')
  argv = [str(source), str(root), '--format=nwb', f'--frame_shape={H},{W}', '--quiet']
  assert sessions.main([*argv, '--part=0/2']) == 0
  assert not (root / neural.CATALOG).exists()   # a part alone does not merge
  assert sessions.main([*argv, '--part=1/2']) == 0   # the last one does
  importer = lambda path, store: nwb.import_nwb(path, store, frame_shape=(H, W), progress=False)
  assert one_by_one(source, reference, ['bad.nwb', 'lab/s2.nwb', 's1.nwb'], importer) == [
      'bad.nwb']
  assert_same_store(root, reference)
  assert 'merged 2 parts' in capsys.readouterr().out
  assert sessions.main([*argv, '--merge']) == 0   # again: the same store
  assert 'skipped 1 (1 × ' in capsys.readouterr().out
  assert_same_store(root, reference)


def test_a_part_left_undone_is_named_by_the_merge(tmp_path, rng, capsys):
  source, root = tmp_path / 'src', tmp_path / 'store'
  for name in ('m1-a', 'm1-b', 'm2-a'):
    write_sensorium(source / name, rng)
  argv = [str(source), str(root), '--format=sensorium', '--quiet']
  assert sessions.main([*argv, '--part=1/4']) == 0
  assert sessions.main([*argv, '--merge']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and '3 part(s) of' in err and 'g0001-p00000-of-00004' in err
  assert not (root / neural.CATALOG).exists()
  with pytest.raises(InputError, match='4 parts, not 2'):
    sessions.import_part(source, root, part=(0, 2), format='sensorium', rate=30.0,
                         frame_shape='36,64', missing_behavior='error')


def test_the_array_task_runs_the_import_with_its_settings(tmp_path, rng):
  source = tmp_path / 'src'
  write_sensorium(source / 'm1-a', rng)
  args = sessions.parser().parse_args([str(source), str(tmp_path / 'store'), '--format=sensorium',
                                       '--frame_shape=6,8', '--rate=20', '--missing_behavior=nan'])
  generation = sessions.plan(args.source, args.out, parts=2, **sessions.settings(args))
  resources = {'partition': '', 'account': '', 'qos': '', 'time': '1:00:00', 'cpus_per_task': 1}
  array, _ = import_array.scripts('sessions', args, generation, [0, 1], resources)
  command = shlex.split(array.splitlines()[-1].replace('${SLURM_ARRAY_TASK_ID}', '1'))
  assert command[:4] == ['exec', sys.executable, '-m', 'brainscale.data.importers.sessions']
  again = sessions.parser().parse_args(command[4:])
  assert sessions.settings(again) == sessions.settings(args) == generation.options
  assert (again.part, again.generation) == ((1, 2), 1)
