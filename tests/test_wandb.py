"""report.wandb_project: the Writer's scalars also go to an (offline) W&B run, read back here
from the run's .wandb file; without it, wandb is never imported."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from wandb.proto import wandb_internal_pb2

from brainscale import config as config_lib
from brainscale.train import report
from conftest import ROOT, xla_flags

BLOCK = 32768   # the .wandb file: a 7-byte header, then a LevelDB log of protobuf Records
FULL, LAST = 1, 4


def wandb_env(tmp_path) -> dict:
  """Offline and quiet, with W&B's own files under tmp_path rather than $HOME."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', WANDB_MODE='offline',
             WANDB_SILENT='true', XLA_FLAGS=xla_flags(1))
  for name in ('WANDB_DIR', 'WANDB_CACHE_DIR', 'WANDB_CONFIG_DIR', 'WANDB_DATA_DIR'):
    env[name] = str(tmp_path / 'home' / name.lower())
  return env


def run_smoke(tmp_path, *args, code=None) -> subprocess.CompletedProcess:
  """launch/run.py --experiment=smoke, or `code` run with those arguments in sys.argv."""
  command = ['launch/run.py'] if code is None else ['-c', code]
  done = subprocess.run([sys.executable, *command, '--experiment=smoke', *args], cwd=ROOT,
                        env=wandb_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def records(path):
  """The protobuf Records of a .wandb file, reassembled from their LevelDB log chunks."""
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B'
  pos, chunks = 7, []
  while pos + 7 <= len(data):
    if BLOCK - pos % BLOCK < 7:   # a block's tail too short for a chunk header is padding
      pos += BLOCK - pos % BLOCK
      continue
    length, kind = struct.unpack('<HB', data[pos + 4:pos + 7])
    chunks.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (FULL, LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b''.join(chunks))
      chunks = []
      yield record


def offline_run(run_dir: str) -> tuple[str, dict, dict[int, dict]]:
  """(run id, config, {step: scalars}) of one offline run directory."""
  (path,) = glob.glob(f'{run_dir}/run-*.wandb')
  run_id, config, history = None, {}, {}
  for record in records(path):
    kind = record.WhichOneof('record_type')
    if kind == 'run':
      run_id = record.run.run_id
      config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    elif kind == 'history':
      row = {i.key or '/'.join(i.nested_key): json.loads(i.value_json)
             for i in record.history.item}
      history[row.pop('_step')] = {k: v for k, v in row.items() if not k.startswith('_')}
  return run_id, config, history


@pytest.mark.slow
def test_scalars_reach_one_wandb_run_across_a_resume(tmp_path):
  workdir = tmp_path / 'run'
  common = [f'--workdir={workdir}', '--config.train.log_every=2',
            '--config.report.wandb_project=test']
  run_smoke(tmp_path, *common, '--config.train.steps=4')
  second = run_smoke(tmp_path, *common, '--config.train.steps=6')
  assert 'resuming from step 4' in second.stdout

  run_dirs = sorted(glob.glob(f'{workdir}/wandb/offline-run-*'))
  assert len(run_dirs) == 2   # one per process; `wandb sync` uploads both to one run
  runs = [offline_run(d) for d in run_dirs]
  assert {run_id for run_id, _, _ in runs} == {(workdir / 'wandb_id').read_text().strip()}
  assert runs[1][1]['experiment'] == 'smoke' and runs[1][1]['train']['steps'] == 6
  assert runs[1][1]['report']['wandb_project'] == 'test'

  jsonl = report.read_jsonl(workdir / 'metrics.jsonl')
  logged = {}   # a resume logs its account of the attempts before it at the step it resumes at
  for _, _, history in runs:
    for step, scalars in history.items():
      logged.setdefault(step, {}).update(scalars)
  assert sorted(logged) == sorted(jsonl) == [2, 4, 6]
  for step, scalars in jsonl.items():
    assert logged[step] == pytest.approx(scalars, rel=1e-6), step
  assert {'train/loss', 'train/grad_norm', 'perf/mfu', 'eval/loss', 'eval/accuracy'} <= set(
      logged[6])
  assert 'eval/loss' in runs[0][2][4]   # the first run's final eval, in its own file


@pytest.mark.slow
def test_training_without_a_project_never_imports_wandb(tmp_path):
  code = ('import runpy, sys\n'
          'try:\n'
          "  runpy.run_path('launch/run.py', run_name='__main__')\n"
          'except SystemExit as e:\n'
          '  assert not e.code, e.code\n'
          "print('wandb imported:', 'wandb' in sys.modules)\n")
  done = run_smoke(tmp_path, f'--workdir={tmp_path / "run"}', '--config.train.steps=2', code=code)
  assert 'step 2/2' in done.stdout
  assert done.stdout.splitlines()[-1] == 'wandb imported: False'
  assert not os.path.exists(tmp_path / 'run' / 'wandb')


def test_a_missing_wandb_package_is_a_config_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)   # `import wandb` now fails
  config = config_lib.load('smoke')
  report.Writer(str(tmp_path / 'without'), config).close()   # no project: not needed
  config.report.wandb_project = 'cwm'
  with pytest.raises(config_lib.ConfigError, match=r"report.wandb_project='cwm' needs the wandb"):
    report.Writer(str(tmp_path / 'with'), config)


@pytest.mark.parametrize('mode, ok', [('', True), ('offline', True), ('disabled', True),
                                      ('offlne', False), ('dryrun', False)])
def test_wandb_mode_is_validated(mode, ok):
  config = config_lib.load('smoke')
  config.report.wandb_mode = mode
  if ok:
    config_lib.validate(config, num_devices=1)
  else:
    with pytest.raises(config_lib.ConfigError, match=f"report.wandb_mode='{mode}'; expected"):
      config_lib.validate(config, num_devices=1)
