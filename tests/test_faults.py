"""Faults a long run meets: broken checkpoints, a full disk, a kill at the very end, read-only
workdirs, bad values. Each asserts the fallback or the one-line `brainscale:` error, and that
no checkpoint already written is lost."""

import contextlib
import glob
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from brainscale.train import loop, report
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import CheckpointError, Checkpoints
from test_train import _kill_when, _losses, run_cli, smoke

pytestmark = pytest.mark.slow

SMOKE = ['--experiment=smoke', '--config.checkpoint.every_steps=10', '--config.train.log_every=1']


def one_error_line(proc, code: int) -> str:
  """The run's single `brainscale:` error line; fails on a traceback or any other code."""
  assert proc.returncode == code, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines()
           if line.startswith('brainscale:') and not line.startswith('brainscale: warning')]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def config(steps: int):
  return smoke(train__steps=steps, train__log_every=1, checkpoint__every_steps=10,
               checkpoint__keep=3)


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: str):
  """A small filesystem of its own at `path` (root only); unmounted afterwards."""
  path.mkdir(parents=True, exist_ok=True)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


# --- a broken checkpoint is stepped past -------------------------------------------------


def _files(step_dir: pathlib.Path, pattern: str) -> list[str]:
  found = sorted(glob.glob(str(step_dir / pattern), recursive=True))
  assert found, f'no {pattern} in {step_dir}'
  return [f for f in found if os.path.isfile(f)]


def _truncate(step_dir):
  for f in _files(step_dir, 'state/**/d/*'):
    os.truncate(f, os.path.getsize(f) // 2)


def _overwrite(step_dir):
  rng = np.random.default_rng(0)
  for f in _files(step_dir, 'state/**/d/*'):
    pathlib.Path(f).write_bytes(rng.bytes(os.path.getsize(f)))


def _half_delete(step_dir):
  shutil.rmtree(step_dir / 'state' / 'ocdbt.process_0')


def _garbled_metadata(step_dir):
  pathlib.Path(_files(step_dir, 'state/_METADATA')[0]).write_bytes(b'\x93\xec' * 64)


def _emptied(step_dir):
  for item in step_dir.iterdir():
    shutil.rmtree(item) if item.is_dir() else item.unlink()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """An uninterrupted 40-step run's losses, and a 30-step run (checkpoints 10, 20, 30)."""
  root = tmp_path_factory.mktemp('runs')
  loop.train(config(40), str(root / 'reference'))
  loop.train(config(30), str(root / 'to30'))
  assert Checkpoints(root / 'to30', keep=3).steps() == [10, 20, 30]
  return _losses(root / 'reference'), root / 'to30'


@pytest.mark.parametrize('corrupt', [_truncate, _overwrite, _half_delete, _garbled_metadata,
                                     _emptied])
def test_a_broken_newest_checkpoint_resumes_from_the_one_before(runs, tmp_path, corrupt, capsys):
  expected, to30 = runs
  workdir = tmp_path / 'run'
  shutil.copytree(to30, workdir)
  corrupt(workdir / 'checkpoints' / '30')
  loop.train(config(40), str(workdir))
  out = capsys.readouterr().out
  assert 'checkpoint step 30 in' in out and 'cannot be read' in out
  assert 'resuming from step 20' in out
  got = _losses(workdir)
  # Steps 21-30 were trained again, bit-identical to the run that never broke.
  assert [s for s in range(21, 41) if got[s] != expected[s]] == []
  assert (workdir / 'broken_checkpoints' / '30').is_dir()   # moved aside, not deleted
  assert Checkpoints(workdir, keep=3).steps() == [20, 30, 40]


def test_no_readable_checkpoint_is_an_error_that_moves_nothing(runs, tmp_path):
  _, to30 = runs
  workdir = tmp_path / 'run'
  shutil.copytree(to30, workdir)
  for step in (10, 20, 30):
    _overwrite(workdir / 'checkpoints' / str(step))
  with pytest.raises(CheckpointError,
                     match=r'none of the checkpoints in .* \(steps \[10, 20, 30\]'):
    loop.train(config(40), str(workdir))
  assert Checkpoints(workdir, keep=3).steps() == [10, 20, 30]
  assert not (workdir / 'broken_checkpoints').exists()


def test_the_cli_steps_past_a_broken_checkpoint_in_one_line(runs, tmp_path):
  """No traceback (TensorStore's abandoned reads included), one line naming step and file."""
  _, to30 = runs
  workdir = tmp_path / 'run'
  shutil.copytree(to30, workdir)
  _overwrite(workdir / 'checkpoints' / '30')
  rerun = run_cli(*SMOKE, f'--workdir={workdir}', '--config.train.steps=32')
  assert rerun.returncode == 0 and 'Traceback' not in rerun.stderr, rerun.stderr[-3000:]
  broken = [line for line in rerun.stdout.splitlines() if 'cannot be read' in line]
  assert len(broken) == 1 and 'checkpoints/30/state' in broken[0], rerun.stdout[-2000:]
  assert 'moved the unreadable checkpoint step 30' in rerun.stderr


# --- a failed save -----------------------------------------------------------------------


def test_a_full_disk_stops_the_run_and_keeps_the_checkpoints_before(tmp_path):
  workdir = tmp_path / 'run'
  with tmpfs(workdir / 'checkpoints', size='3m'):   # two smoke checkpoints (1.3 MB each) fit
    proc = run_cli(*SMOKE, f'--workdir={workdir}', '--config.train.steps=60')
    line = one_error_line(proc, code=74)
    assert f'could not save checkpoint step 30 in {workdir}/checkpoints' in line
    assert 'RESOURCE_EXHAUSTED' in line or 'No space' in line
    assert not glob.glob(f'{workdir}/checkpoints/*tmp*')   # its own temporary folder went
    checkpoints = Checkpoints(workdir, keep=3, async_save=False)
    assert checkpoints.steps() == [10, 20]
    setup = step_lib.build(config(60))
    for step in (10, 20):
      state = checkpoints.restore(step, setup.abstract_state)
      assert int(state['step']) == step
    checkpoints.close()


def test_a_save_that_fails_is_one_error_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
  """The same without root: the third save fails inside Orbax's writer."""
  calls = []
  original = ocp.CheckpointManager.save

  def failing_save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 3:
      (pathlib.Path(self.directory) / f'{step}.orbax-checkpoint-tmp-1').mkdir()
      raise OSError(28, 'No space left on device', str(self.directory))
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', failing_save)
  with pytest.raises(CheckpointError) as error:
    loop.train(config(40), str(tmp_path))
  assert str(error.value).startswith(f'could not save checkpoint step 30 in {tmp_path}/checkpoints')
  assert 'No space left on device' in str(error.value) and '\n' not in str(error.value)
  assert not glob.glob(f'{tmp_path}/checkpoints/*tmp*')
  assert Checkpoints(tmp_path, keep=3).steps() == [10, 20]


# --- a run ends complete -----------------------------------------------------------------


def test_a_run_killed_before_its_final_eval_writes_it_when_rerun(tmp_path):
  args = [*SMOKE, '--config.train.steps=20']
  for attempt in range(3):   # the kill must land after checkpoint 20 and before the eval
    workdir = tmp_path / f'attempt{attempt}'
    done = lambda w=workdir: os.path.isdir(w / 'checkpoints' / '20')
    assert _kill_when([*args, f'--workdir={workdir}'], workdir, done)
    if 'eval/loss' not in report.read_jsonl(workdir / 'metrics.jsonl').get(20, {}):
      break
  else:
    pytest.fail('three kills all landed after the final eval')
  assert Checkpoints(workdir, keep=3).steps()[-1] == 20

  rerun = run_cli(*args, f'--workdir={workdir}')
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'its final eval is missing' in rerun.stdout
  assert 'eval/loss' in report.read_jsonl(workdir / 'metrics.jsonl')[20]
  again = run_cli(*args, f'--workdir={workdir}')
  assert 'nothing to do' in again.stdout and 'eval step' not in again.stdout


# --- workdirs and values -----------------------------------------------------------------


def test_a_read_only_workdir_evaluates_but_does_not_train(tmp_path):
  workdir = tmp_path / 'run'
  with tmpfs(workdir, size='64m'):
    trained = run_cli(*SMOKE, f'--workdir={workdir}', '--config.train.steps=10')
    assert trained.returncode == 0, trained.stderr[-3000:]
    subprocess.run(['mount', '-o', 'remount,ro', str(workdir)], check=True)
    evaluated = run_cli(*SMOKE, f'--workdir={workdir}', '--mode=eval')
    assert evaluated.returncode == 0 and 'Traceback' not in evaluated.stderr, evaluated.stderr
    assert 'eval step 10 |' in evaluated.stdout
    assert f'brainscale: warning: cannot write metrics to {workdir}' in evaluated.stderr
    more = run_cli(*SMOKE, f'--workdir={workdir}', '--config.train.steps=20')
    line = one_error_line(more, code=2)
    assert line == (f'brainscale: workdir={workdir} is not writable (Read-only file system); '
                    'expected a directory this job can write')
    assert Checkpoints(workdir, keep=3, async_save=False).steps() == [10]


@pytest.mark.parametrize('args, expected', [
    (['--config.train.steps=-5'], 'brainscale: train.steps=-5; expected a positive integer'),
    (['--config.checkpoint.every_steps=0'], 'brainscale: checkpoint.every_steps=0; expected'),
    (['--config.train.batch_size=3'], 'brainscale: train.batch_size=3 does not split over 2'),
    (['--workdir={file}'], 'brainscale: workdir={file} is a file; expected a directory'),
    (['--config.train.groups.no_decay.pattern=nrom'],
     "brainscale: train.groups.no_decay.pattern='nrom' matches no parameter; expected a regex"),
])
def test_bad_values_are_one_line_before_anything_is_built(tmp_path, args, expected):
  file = tmp_path / 'a_file'
  file.write_text('')
  args = [a.format(file=file) for a in args]
  workdir = [] if any(a.startswith('--workdir') for a in args) else [f'--workdir={tmp_path}']
  proc = run_cli('--experiment=smoke', *workdir, *args, devices=2)
  assert one_error_line(proc, code=2).startswith(expected.format(file=file))
  assert not (tmp_path / 'checkpoints').exists()


def test_traceback_flag_shows_the_traceback(tmp_path):
  proc = run_cli('--experiment=smoke', f'--workdir={tmp_path}', '--config.train.steps=-5',
                 '--traceback')
  assert proc.returncode != 0 and 'Traceback' in proc.stderr and 'ConfigError' in proc.stderr


def test_restore_newest_agrees_with_orbax_when_nothing_is_broken(runs):
  _, to30 = runs
  checkpoints = Checkpoints(to30, keep=3, async_save=False)
  step, state = checkpoints.restore_newest(step_lib.build(config(30)).abstract_state)
  assert step == 30 == int(jax.device_get(state['step']))
  checkpoints.close()


def test_two_jobs_on_one_machine_make_a_dataset_once(tmp_path):
  """Both wait on the cache's lock; the second finds the first one's data done."""
  script = (
      'import pathlib, sys, time\n'
      'from brainscale.data import cache\n'
      'd = pathlib.Path(sys.argv[1])\n'
      'def make():\n'
      '  d.mkdir(exist_ok=True)\n'
      '  with open(d.parent / "makers", "a") as f: f.write("made\\n")\n'
      '  time.sleep(1.0)\n'
      '  (d / "done").touch()\n'
      'cache.make_once(d, "done", make)\n')
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parent.parent))
  jobs = [subprocess.Popen([sys.executable, '-c', script, str(tmp_path / 'set')], env=env)
          for _ in range(2)]
  assert [job.wait(timeout=120) for job in jobs] == [0, 0]
  assert (tmp_path / 'makers').read_text() == 'made\n'


def test_a_dataset_is_named_by_its_spec_and_the_code_that_makes_it(tmp_path, monkeypatch):
  """An edit to a generator's source names a new dataset: the stale one is never reused."""
  from brainscale.data import cache  # noqa: PLC0415

  def module(name, source):
    path = tmp_path / f'{name}.py'
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded

  monkeypatch.setenv('BRAINSCALE_DATA', str(tmp_path / 'data'))
  maker = module('maker', 'SCALE = 1.0\n')
  name = cache.named('set', {'n': 1}, (maker,))
  assert name.parent == tmp_path / 'data' and name.name.startswith('set_')
  assert cache.named('set', {'n': 1}, (module('copy', 'SCALE = 1.0\n'),)) == name
  assert cache.named('set', {'n': 1}, (module('edited', 'SCALE = 2.0\n'),)) != name
  assert cache.named('set', {'n': 2}, (maker,)) != name


def test_a_disk_that_fills_during_the_final_checkpoint_is_exit_74_and_the_rerun_finishes(tmp_path):
  """The whole workdir on a small filesystem: the last save fails in Orbax's background
  threads (or TensorBoard's writes fail first). One line with the step and folder, exit 74,
  no traceback from any writer at exit, no temporary folder; with space freed, the rerun
  resumes from the last good checkpoint and ends with its final eval."""
  args = [*SMOKE, '--config.train.steps=30']
  with tmpfs(tmp_path / 'disk', size='2900k') as disk:   # checkpoints 10 and 20 fit (1.3 MB)
    workdir = disk / 'run'
    proc = run_cli(*args, f'--workdir={workdir}')
    line = one_error_line(proc, code=74)
    where = f'{workdir}/checkpoints'
    assert line.startswith(f'brainscale: could not save checkpoint step 30 in {where}')
    assert 'RESOURCE_EXHAUSTED' in line or 'No space' in line
    assert 'Exception ignored' not in proc.stderr and 'Error in atexit' not in proc.stderr
    assert not glob.glob(f'{workdir}/checkpoints/*tmp*')
    assert Checkpoints(workdir, keep=3, async_save=False).steps() == [10, 20]

    subprocess.run(['mount', '-o', 'remount,size=20m', str(disk)], check=True)
    rerun = run_cli(*args, f'--workdir={workdir}')
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert 'resuming from step 20' in rerun.stdout and 'eval step 30' in rerun.stdout
    assert 'eval/loss' in report.read_jsonl(workdir / 'metrics.jsonl')[30]
    assert Checkpoints(workdir, keep=3, async_save=False).steps() == [10, 20, 30]
