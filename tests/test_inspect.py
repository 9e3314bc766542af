"""brainscale.inspect: any checkpoint restored on this process's devices, its curves, its data."""

import json
import subprocess
import sys

import numpy as np
import pytest

from brainscale import inspect
from conftest import ROOT
from test_train import cli_env, run_cli

CHECKSUM = '''
import json, sys
import jax, numpy as np
from brainscale import inspect
run = inspect.load(sys.argv[1])
batch = run.batches('eval')[0]
loss, _ = run.task.loss(run.model, batch, jax.random.key(0), False)
print(json.dumps({'step': run.step, 'devices': jax.device_count(),
                  'checksum': float(sum(np.abs(np.asarray(x, np.float64)).sum()
                                        for x in jax.tree.leaves(run.params))),
                  'loss': float(loss)}))
'''


@pytest.fixture(scope='module')
def saved_on_8(tmp_path_factory):
  """smoke trained 12 steps on a (data 2, fsdp 2, tensor 2) mesh, checkpoints at 6 and 12."""
  workdir = tmp_path_factory.mktemp('inspect') / 'smoke'
  done = run_cli('--experiment=smoke', f'--workdir={workdir}', '--config.train.steps=12',
                 '--config.checkpoint.every_steps=6', '--config.mesh.ici.data=2',
                 '--config.mesh.ici.fsdp=2', '--config.mesh.ici.tensor=2', devices=8)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def _summary(path, devices: int) -> dict:
  done = subprocess.run([sys.executable, '-c', CHECKSUM, str(path)], cwd=ROOT,
                        env={**cli_env(devices), 'PYTHONPATH': str(ROOT)}, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_checkpoint_saved_on_8_devices_loads_on_1(saved_on_8):
  one, eight = _summary(saved_on_8, 1), _summary(saved_on_8, 8)
  assert (one['devices'], eight['devices']) == (1, 8)
  assert one['step'] == eight['step'] == 12
  assert one['checksum'] == pytest.approx(eight['checksum'], rel=1e-9)
  assert np.isfinite(one['loss']) and one['loss'] == pytest.approx(eight['loss'], rel=1e-3)
  assert _summary(saved_on_8 / 'checkpoints' / '6', 1)['step'] == 6   # a step folder


@pytest.mark.slow
def test_curves_overview_and_batches(saved_on_8):
  run = inspect.load(saved_on_8)
  curves = run.curves()
  steps, losses = curves['train/loss']
  assert list(steps) == [12] and np.isfinite(losses).all()   # smoke logs every 25 steps
  assert list(curves['eval/loss'][0]) == [12]
  overview = run.parameter_overview()
  assert 'head/w_DxV' in overview and 'Total:' in overview
  eval_batches = run.batches('eval', count=2)
  assert len(eval_batches) == 2 and eval_batches[0]['inputs'].shape == (32, 17)
  assert run.batches('train')[0]['targets'].shape == (32, 17)
  with pytest.raises(ValueError, match='train.eval_batches=2'):
    run.batches('eval', count=3)


@pytest.mark.slow
def test_clear_errors_for_no_checkpoint_and_a_missing_step(saved_on_8, tmp_path):
  with pytest.raises(FileNotFoundError, match=f'no checkpoint in {tmp_path}'):
    inspect.load(tmp_path)
  with pytest.raises(FileNotFoundError, match='no checkpoint of step 7 .* it has steps 6, 12'):
    inspect.load(saved_on_8, step=7)
  assert inspect.steps(saved_on_8) == [6, 12] and inspect.steps(tmp_path) == []
