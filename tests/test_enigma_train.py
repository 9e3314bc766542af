"""Enigma end to end: enigma_tiny learns and is scored, adapts to a new session, trains on imports.

The first three tests share enigma_tiny's full default training run: they are the `acceptance`
stage (`pytest -m acceptance`), apart from the rest of the suite.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from brainscale import config as config_lib
from brainscale.data import neural
from brainscale.data.importers import nwb, sensorium
from brainscale.data.synthetic import v1, v1_files
from brainscale.train import loop
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import Checkpoints
from conftest import ROOT
from neural_helpers import write_simulated_nwb
from test_train import cli_env, run_cli, start_cli

FAST = ['--config.model.dim=64', '--config.model.heads=4', '--config.model.mlp_hidden=128',
        '--config.train.batch_size=8', '--config.train.steps=3', '--config.train.log_every=1',
        '--config.train.eval_batches=1', '--config.checkpoint.async_save=false',
        '--config.evaluation.sessions=0']
# The acceptance tests' limit (pytest-timeout; pytest.ini's 20 minutes is for unit tests): the
# first includes enigma_tiny's 1800-step run, ~22 minutes on 2 cores.
RUN_TIMEOUT_S = 3600


def _eval_metrics(stdout: str, step: int) -> dict[str, float]:
  """The metrics of the last `eval step STEP | name value | ... | seconds` line."""
  line = [x for x in stdout.splitlines() if x.startswith(f'eval step {step} | ')][-1]
  return {k: float(v) for k, v in (item.split() for item in line.split(' | ')[1:-1])}


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """enigma_tiny trained as the README gives it: launch/run.py with the experiment's defaults
  (1800 steps) on one CPU device, on the simulated population of the data cache
  ($BRAINSCALE_DATA; the first run that asks for it simulates it there). Then, side by side
  on two cores: --mode=eval of it, enigma_tiny_adapt from it (100 steps, one device), and
  `python -m brainscale.enigma.insilico` on it (sessions a0s0 and a1s0). Yields the runs
  folder, the eval metrics, the adaptation's final eval metrics and the in-silico report."""
  runs = tmp_path_factory.mktemp('runs')
  workdir = f'--workdir={runs / "enigma_tiny"}'
  out = run_cli('--experiment=enigma_tiny', workdir, timeout=2400)
  assert out.returncode == 0, out.stderr[-3000:]
  report = runs / 'insilico.json'
  started = [
      start_cli('--experiment=enigma_tiny', workdir, '--mode=eval'),
      start_cli('--experiment=enigma_tiny_adapt', f'--workdir={runs / "adapt"}',
                '--config.checkpoint.async_save=false', '--config.train.steps=100',
                f'--config.adapt.workdir={runs / "enigma_tiny"}'),
      subprocess.Popen([sys.executable, '-m', 'brainscale.enigma.insilico', workdir,
                        '--sessions=a0s0,a1s0', f'--out={report}'], cwd=ROOT, env=cli_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
  outputs = [run.communicate(timeout=1200) for run in started]
  for run, (_, stderr) in zip(started, outputs):
    assert run.returncode == 0, stderr[-3000:]
  return (runs, _eval_metrics(outputs[0][0], 1800), _eval_metrics(outputs[1][0], 100),
          json.loads(report.read_text()))


def _params(workdir, config):
  setup = step_lib.build(config)
  ckpt = Checkpoints(workdir, keep=3, async_save=False)
  params = ckpt.restore(ckpt.latest(), setup.abstract_state)['params']
  ckpt.close()
  return params


@pytest.mark.slow
@pytest.mark.acceptance
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_enigma_tiny_beats_ln_on_held_out_repeats(tiny_run):
  """enigma_tiny's quality bar on held-out repeats: cc_norm >= 0.75 and at least 0.05 above
  the LN baseline, whose own cc_norm lies between 0.2 and 0.6."""
  _, m, _, _ = tiny_run
  for k in ('single_trial_corr', 'corr_to_average', 'cc_norm', 'ln_baseline_cc_norm',
            'behavior_r2'):
    assert np.isfinite(m[k]), (k, m)
  assert m['cc_norm'] >= 0.75, m
  assert m['cc_norm'] >= m['ln_baseline_cc_norm'] + 0.05, m
  assert 0.2 < m['ln_baseline_cc_norm'] < 0.6, m   # complex cells defeat the LN model


@pytest.mark.slow
@pytest.mark.acceptance
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_a_new_session_adapts_with_the_core_frozen(tiny_run):
  """Fitting only the new session's embeddings for 100 steps reaches 85% of the joint CC_norm
  (measured 0.699 against 0.85 x 0.763 = 0.649; 0.712 after 150 steps: benchmarks/RESULTS.md,
  "seventh session")."""
  runs, joint, adapted, _ = tiny_run
  assert adapted['cc_norm'] >= 0.85 * joint['cc_norm'], (adapted, joint)
  c = config_lib.resolve('enigma_tiny_adapt', [f'--config.adapt.workdir={runs / "enigma_tiny"}'])
  base = config_lib.resolve('enigma_tiny', [])
  before = nnx.State(_params(str(runs / 'enigma_tiny'), base)['core']).flat_state()
  after = nnx.State(_params(str(runs / 'adapt'), c)['core']).flat_state()
  for (path, a), (_, b) in zip(before, after):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


@pytest.mark.slow
@pytest.mark.acceptance
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_in_silico_tuning_and_rfs_agree_with_the_simulators_truth(tiny_run):
  """python -m brainscale.enigma.insilico on the trained run, two sessions: over the neurons
  it predicts well (cc_norm >= 0.5), the median preferred-orientation error is <= 15 deg and
  the median RF-centre error <= 3 px (the issue's bar; the 1800-step run measured 7.1 deg and
  1.9 px here, complex cells alone 2.6 deg and 2.2 px: benchmarks/RESULTS.md, "In-silico
  experiments against the simulator"). The simple cells' orientation, 24 deg, is reported,
  not held."""
  found = tiny_run[3]['all']
  both, complex_ = found['both'], found['complex']
  assert both['neurons'] >= 60 and complex_['neurons'] >= 30, found
  assert both['orientation_error_deg'] <= 15 and both['rf_centre_error_px'] <= 3, found
  assert complex_['orientation_error_deg'] <= 15 and complex_['rf_centre_error_px'] <= 3, found


def test_imported_sensorium_and_nwb_sessions_train(tmp_path):
  """Both importers feed one store that enigma_tiny trains on (a few steps)."""
  spec = v1.Spec(animals=2, sessions_per_animal=1, neurons=24, train_trials=4,
                 validation_trials=2, repeat_stimuli=1, repeats=2, trial_seconds=4.0)
  store = tmp_path / 'store'
  v1_files.write_sensorium(tmp_path / 'mouse0', v1.simulate_session(spec, 0, 0))
  sensorium.import_sensorium(tmp_path / 'mouse0', store, progress=False)
  write_simulated_nwb(tmp_path / 'mouse1.nwb', v1.simulate_session(spec, 1, 0))
  nwb.import_nwb(tmp_path / 'mouse1.nwb', store, progress=False)
  s = neural.Store(store)
  assert sorted(s.session_names) == ['mouse0', 'mouse1'] and s.num_neurons == 48
  c = config_lib.resolve('enigma_tiny', FAST + [f'--config.data.root={store}',
                                                '--config.data.holdout=()'])
  m = loop.train(c, str(tmp_path / 'run'))
  assert np.isfinite(m['loss']) and 'eval_loss' in m
  # a Sensorium store alone has test trials but no validation tier: its eval loss still runs
  only = config_lib.resolve('enigma_tiny', FAST + [f'--config.data.root={store}',
                                                   '--config.data.holdout=()',
                                                   "--config.data.sessions=('mouse0',)"])
  assert 'eval_loss' in loop.train(only, str(tmp_path / 'run_sensorium'))
