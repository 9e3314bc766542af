"""The video importer in parts (--part=i/n, --merge) and as a SLURM job array
(launch/import_array.py): the same clips, order and report as the one-machine import,
a killed task redone alone, files added later imported alone.

Clips are written with the ffmpeg CLI (the tests skip without one, fail under
BRAINSCALE_REQUIRE_FFMPEG=1); the array tests share one local SLURM cluster per module.
"""

import hashlib
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from brainscale.data import video
from brainscale.data.importers import parts, videos
from launch import import_array
from test_data_quirks import ffmpeg_cli
from test_slurm import (
  bash_syntax_ok,
  local_slurm_states,
  sbatch_options,
  start_local_slurm,
  wait_for,
)

SETTINGS = ['--clip_seconds=0.5', '--max_side=32', '--records_per_shard=4']
SLOW = 'long-3.mp4'   # part 1 of 3 (parts.part_of): long enough to be killed mid-part


def write_clip(path: pathlib.Path, seconds: float, size: str = '64x48', rate: int = 10,
               source: str = 'testsrc'):
  """A clip written by the ffmpeg CLI from one of its test sources."""
  path.parent.mkdir(parents=True, exist_ok=True)
  codec = {'.webm': ['-c:v', 'libvpx-vp9', '-deadline', 'realtime'],
           '.avi': ['-c:v', 'mpeg4']}.get(path.suffix, ['-c:v', 'libx264', '-preset', 'ultrafast'])
  subprocess.run([ffmpeg_cli(), '-v', 'error', '-y', '-f', 'lavfi', '-i',
                  f'{source}=size={size}:rate={rate}:duration={seconds}', *codec,
                  '-pix_fmt', 'yuv420p', str(path)], check=True, timeout=120)
  return path


def write_source(root: pathlib.Path, rng) -> pathlib.Path:
  """Valid clips of a few containers and lengths, corrupt files and a note."""
  for k in range(8):
    name = ['a/c{}.mp4', 'b/c{}.webm', 'c{}.avi', 'c{}.mkv'][k % 4].format(k)
    write_clip(root / name, round(float(rng.uniform(0.6, 1.6)), 1),
               source=['testsrc', 'testsrc2', 'smptebars'][k % 3])
  write_clip(root / SLOW, 12, size='1280x720', rate=25, source='testsrc2')
  data = (root / 'a/c0.mp4').read_bytes()
  (root / 'cut.mp4').write_bytes(data[:len(data) // 3])   # its index (moov) is at the end
  (root / 'b/noise.webm').write_bytes(rng.bytes(3000))
  (root / 'empty.mov').write_bytes(b'')
  (root / 'notes.txt').write_text('not a video\n')
  return root


def one_machine_import(source, out):
  videos.import_videos(source, out, clip_seconds=0.5, max_side=32, records_per_shard=4,
                       progress=False)
  return out


def assert_same_import(got: pathlib.Path, expected: pathlib.Path):
  """The same clips (records, so decoded frames too) in the same index order, the same report."""
  a, b = (json.loads((d / 'index.json').read_text()) for d in (got, expected))
  where = lambda c: {k: v for k, v in c.items() if k not in ('shard', 'record')}
  assert [where(c) for c in a['clips']] == [where(c) for c in b['clips']]
  assert {k: a[k] for k in ('format', 'records', 'videos', 'options')} == {
      k: b[k] for k in ('format', 'records', 'videos', 'options')}
  source_a, source_b = video.ClipSource(got), video.ClipSource(expected)
  assert len(source_a) == len(source_b) == len(a['clips'])
  for k in range(len(source_a)):
    assert source_a[k] == source_b[k], a['clips'][k]
    if k % 7 == 0:
      header, data, _ = video.decode_record(source_a[k])
      assert header['source'] == a['clips'][k]['source'] and header['clip'] == a['clips'][k]['clip']
      frames = range(header['frames'])
      np.testing.assert_array_equal(video.decode_frames(data, list(frames)),
                                    video.decode_frames(video.decode_record(source_b[k])[1],
                                                        list(frames)))
  assert json.loads((got / 'report.json').read_text()) == json.loads(
      (expected / 'report.json').read_text())


def command_of(script: pathlib.Path) -> list[str]:
  """The words of the script's last line, after `exec`."""
  words = shlex.split(script.read_text().splitlines()[-1])
  assert words[0] == 'exec'
  return words[1:]


def fingerprints(folder: pathlib.Path) -> dict[str, tuple[int, int, str]]:
  """(inode, mtime in ns, sha256) of every file under folder."""
  return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(folder.rglob('*')) if p.is_file()}


# --- parts, without SLURM --------------------------------------------------------------


def test_a_name_keeps_its_part_and_new_names_form_a_new_generation(tmp_path, rng):
  names = [f'{rng.integers(1 << 30):x}/clip-{k}.mp4' for k in range(200)]
  split = {name: parts.part_of(name, 7) for name in names}
  assert set(split.values()) == set(range(7))
  assert all(parts.part_of(name, 7) == i for name, i in split.items())   # a pure function
  first = parts.current(tmp_path, names[:150], parts=7, options={'x': 1})
  assert first.number == 1 and first.names == tuple(sorted(names[:150]))
  assert sorted(n for i in range(7) for n in first.names_of(i)) == sorted(names[:150])
  assert parts.current(tmp_path, names, parts=7, options={'x': 1}) == first   # parts to do
  for i in range(7):
    parts.build(tmp_path, first, i, lambda folder: None)
  second = parts.current(tmp_path, names, parts=5, options={'x': 1})
  assert second.number == 2 and second.names == tuple(sorted(names[150:]))   # only the new
  with pytest.raises(ValueError, match=r'generation 2 of this import has 5 parts, not 7'):
    parts.current(tmp_path, names, parts=7, options={'x': 1})
  with pytest.raises(ValueError, match=r'imported with x=1 \(this run: 2\)'):
    parts.current(tmp_path, names, parts=5, options={'x': 2})


@pytest.mark.parametrize('text', ['3/3', '1', '-1/2', 'a/b', '1/0'])
def test_a_bad_part_is_a_one_line_error(text):
  with pytest.raises(ValueError, match=re.escape(f'--part={text} is not i/n')):
    parts.parse_part(text)


def test_array_spec_lists_the_parts_to_do():
  assert import_array.array_spec([0, 1, 2]) == '0-2'
  assert import_array.array_spec([1, 3, 4, 5, 9], max_running=2) == '1,3-5,9%2'


def test_merge_waits_for_every_part_and_a_done_part_is_skipped(tmp_path, rng, capsys):
  source = tmp_path / 'src'
  for k in range(4):
    write_clip(source / f'c{k}.mp4', 0.6)
  out, argv = tmp_path / 'out', [str(source), str(tmp_path / 'out'), '--quiet', '--workers=1',
                              *SETTINGS]
  assert videos.main([*argv, '--part=0/2']) == 0
  assert videos.main([*argv, '--merge']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and '1 part(s) of' in err and 'g0001-p00001-of-00002' in err
  assert not (out / 'index.json').exists()
  done = fingerprints(out / 'parts')
  assert videos.main([*argv, '--part=0/2']) == 0 and 'already done' in capsys.readouterr().err
  assert fingerprints(out / 'parts') == done
  assert videos.main([*argv, '--part=1/2']) == 0   # the last part merges
  printed = capsys.readouterr().out
  assert 'merged 2 parts (1 generation(s))' in printed and 'imported 4 videos' in printed
  assert_same_import(out, one_machine_import(source, tmp_path / 'one'))


def test_the_array_scripts_are_printed_where_there_is_no_sbatch(tmp_path, monkeypatch, capsys):
  source, out = tmp_path / 'src', tmp_path / 'out'
  write_clip(source / 'a.mp4', 0.6)
  with monkeypatch.context() as patch:
    patch.setenv('PATH', str(tmp_path))   # no sbatch
    patch.chdir(tmp_path)   # SOURCE and OUT relative to here; the job's command makes them absolute
    assert import_array.main(['videos', 'src', 'out', '--parts=4', '--max_running=2',
                              '--partition=cpu', '--qos=low', '--time=01:00:00',
                              '--cpus_per_task=3', *SETTINGS]) == 0
  printed = capsys.readouterr().out
  array, merge = (out / 'slurm' / f'{k}-g0001.sbatch' for k in ('import', 'merge'))
  assert printed == array.read_text() + '\n' + merge.read_text() + printed.splitlines(
      keepends=True)[-1]
  assert 'sbatch not found' in printed.splitlines()[-1]
  assert command_of(array)[:5] == [sys.executable, '-m', 'brainscale.data.importers.videos',
                                   str(source), str(out)]
  for path in (array, merge):
    bash_syntax_ok(path)
    assert {'--partition=cpu', '--qos=low', '--time=01:00:00', '--ntasks=1'} <= set(
        sbatch_options(path.read_text()))
  options = sbatch_options(array.read_text())
  assert {'--array=0-3%2', '--cpus-per-task=3', f'--output={out}/logs/import-g0001-%A_%a.log'} <= (
      set(options))
  command = array.read_text().splitlines()[-1]
  assert '--part=${SLURM_ARRAY_TASK_ID}/4 --generation=1 --workers=3' in command
  assert all(s in command for s in SETTINGS)
  assert {'--dependency=afterok:ARRAY_JOB_ID', '--kill-on-invalid-dep=yes'} <= set(
      sbatch_options(merge.read_text()))
  assert merge.read_text().splitlines()[-1].endswith(' --merge')


# --- a job array on a local SLURM cluster ------------------------------------------------


@pytest.fixture(scope='module')
def cluster():
  """A one-node SLURM cluster for this module: the environment to run sbatch in."""
  with local_slurm_states(prefix='brainscale-import-slurm-') as (state_dir,):
    yield start_local_slurm(state_dir)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """write_source's folder and its one-machine import: (source, the import)."""
  root = tmp_path_factory.mktemp('array')
  src = write_source(root / 'src', np.random.default_rng(33))
  assert parts.part_of(SLOW, 3) == 1
  return src, one_machine_import(src, root / 'one')


def submit(source, out, cluster, monkeypatch, parts_=3) -> tuple[int, int]:
  for key in ('SLURM_CONF', 'PATH'):
    monkeypatch.setenv(key, cluster[key])
  args = videos.parser().parse_args([str(source), str(out), *SETTINGS])
  resources = {'partition': '', 'account': '', 'qos': '', 'time': '00:10:00', 'cpus_per_task': 1}
  jobs = import_array.submit('videos', args, parts=parts_, resources=resources)
  assert jobs is not None
  return jobs


def logs(out: pathlib.Path) -> str:
  return '\n'.join(f'== {p.name}\n{p.read_text()[-2000:]}' for p in sorted(out.glob('logs/*')))


@pytest.mark.slow
def test_an_array_of_three_tasks_and_the_merge_equal_the_one_machine_import(
    cluster, source, tmp_path, monkeypatch):
  src, reference = source
  out = tmp_path / 'out'
  array_job, merge_job = submit(src, out, cluster, monkeypatch)
  assert wait_for(merge_job, cluster) == 'COMPLETED', logs(out)
  assert sorted(p.name for p in (out / 'parts').iterdir()) == [
      'g0001-p00000-of-00003', 'g0001-p00001-of-00003', 'g0001-p00002-of-00003', 'g0001.json']
  assert_same_import(out, reference)
  for i in range(3):
    log = (out / 'logs' / f'import-g0001-{array_job}_{i}.log').read_text()
    assert re.search(rf'import videos g0001 part {i}/3: (\d+)/\1 files, \d+ clips, \d+ skipped, '
                     r'[\d.]+ files/s, took', log), log
  merged = (out / 'logs' / f'merge-{merge_job}.log').read_text()
  assert 'merged 3 parts (1 generation(s))' in merged and 'imported 9 videos' in merged
  assert 'skipped 3 files' in merged and '1 × ValueError: empty file' in merged

  # Files added to SOURCE since: a rerun imports only them, in a generation of their own.
  grown = tmp_path / 'grown'
  shutil.copytree(src, grown)
  shutil.copytree(out, tmp_path / 'out2')
  write_clip(grown / 'new/d.mp4', 0.8, source='smptebars')
  (grown / 'new/bad.mp4').write_text('not a video')
  out2, before = tmp_path / 'out2', fingerprints(tmp_path / 'out2' / 'parts')
  _, merge_job = submit(grown, out2, cluster, monkeypatch, parts_=2)
  assert wait_for(merge_job, cluster) == 'COMPLETED', logs(out2)
  g2 = json.loads((out2 / 'parts' / 'g0002.json').read_text())
  assert g2['names'] == ['new/bad.mp4', 'new/d.mp4'] and g2['parts'] == 2
  after = fingerprints(out2 / 'parts')
  assert {k: after[k] for k in before} == before   # generation 1 untouched
  assert_same_import(out2, one_machine_import(grown, tmp_path / 'one-grown'))


@pytest.mark.slow
def test_a_task_killed_mid_part_is_redone_alone_on_resubmission(
    cluster, source, tmp_path, monkeypatch):
  src, reference = source
  out = tmp_path / 'out'
  array_job, merge_job = submit(src, out, cluster, monkeypatch)
  with pytest.raises(ValueError, match=rf'jobs {array_job}_\S+ .* still queued or running'):
    submit(src, out, cluster, monkeypatch)   # its parts would run twice
  deadline = time.monotonic() + 240
  while not list((out / 'parts').glob('.g0001-p00001-of-00003.tmp-*')):   # part 1 under way
    assert time.monotonic() < deadline, logs(out)
    time.sleep(0.01)
  subprocess.run(['scancel', '--signal=KILL', '--full', f'{array_job}_1'], env=cluster,
                 check=True)
  assert wait_for(merge_job, cluster) == 'CANCELLED', logs(out)   # its dependency failed
  for i in (0, 2):
    assert wait_for(f'{array_job}_{i}', cluster) == 'COMPLETED', logs(out)
  assert wait_for(f'{array_job}_1', cluster) in {'FAILED', 'CANCELLED'}
  assert not (out / 'parts' / 'g0001-p00001-of-00003').exists()
  assert not (out / 'index.json').exists()
  assert list((out / 'parts').glob('.g0001-p00001-of-00003.tmp-*'))   # killed mid-part
  kept = {i: fingerprints(out / 'parts' / f'g0001-p{i:05d}-of-00003') for i in (0, 2)}

  array_job, merge_job = submit(src, out, cluster, monkeypatch)
  assert '#SBATCH --array=1\n' in (out / 'slurm' / 'import-g0001.sbatch').read_text()
  assert wait_for(merge_job, cluster) == 'COMPLETED', logs(out)
  assert {i: fingerprints(out / 'parts' / f'g0001-p{i:05d}-of-00003') for i in (0, 2)} == kept
  assert not list((out / 'parts').glob('.*.tmp-*'))
  assert_same_import(out, reference)


def test_partition_account_and_qos_come_from_the_experiment_unless_flags_say(
    tmp_path, monkeypatch, capsys):
  source, out = tmp_path / 'src', tmp_path / 'out'
  write_clip(source / 'a.mp4', 0.6)
  monkeypatch.setenv('PATH', str(tmp_path))   # no sbatch
  argv = ['videos', str(source), str(out), '--parts=2', *SETTINGS]
  assert import_array.main([*argv, '--experiment=smoke']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and '--submit needs a cluster section' in err
  assert import_array.main([*argv, '--experiment=cwm_80b', '--qos=high']) == 0
  options = sbatch_options((out / 'slurm' / 'import-g0001.sbatch').read_text())
  assert '--qos=high' in options and not any(o.startswith(('--partition', '--account'))
                                             for o in options)   # cwm_80b leaves them ''
  assert import_array.main([*argv, '--part=0/2']) == 2
  assert 'set by the array script' in capsys.readouterr().err


def test_a_busy_import_names_its_jobs_in_submission_order(tmp_path, monkeypatch):
  """squeue lists the pending merge before the array's running tasks; the refusal names them
  as they were submitted (the array first), and never a job of another import."""
  out = tmp_path / 'out'
  tag, other = import_array._tag(out), import_array._tag(tmp_path / 'other')
  squeue = tmp_path / 'bin' / 'squeue'
  squeue.parent.mkdir()
  squeue.write_text('#!/bin/sh\n' + ''.join(
      f'echo "{job} {name}"\n' for job, name in [
          ('11', f'merge-g0001-{tag}'), ('9', f'import-g0001-{other}'),
          ('8_[2-3]', f'import-g0001-{tag}'), ('8_1', f'import-g0001-{tag}'),
          ('8_0', f'import-g0001-{tag}')]))
  squeue.chmod(0o755)
  monkeypatch.setenv('PATH', str(squeue.parent))
  with pytest.raises(ValueError, match=r'^jobs 8_\[2-3\], 8_0, 8_1, 11 of this import of '):
    import_array._check_idle(out)
