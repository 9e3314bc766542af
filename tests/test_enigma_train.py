"""Enigma end to end: enigma_tiny learns and is scored, adapts to a new session, trains on imports.

The first two tests share enigma_tiny's full default training run: they are the `acceptance`
stage (`pytest -m acceptance`), apart from the rest of the suite.
"""

import datetime

import numpy as np
import pynwb
import pytest
from flax import nnx
from pynwb import behavior as nb
from pynwb import image, ophys

from brainscale import config as config_lib
from brainscale.data import neural
from brainscale.data.importers import nwb, sensorium
from brainscale.data.synthetic import v1
from brainscale.train import loop
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import Checkpoints
from test_train import run_cli

FAST = ['--config.model.dim=64', '--config.model.heads=4', '--config.model.mlp_hidden=128',
        '--config.train.batch_size=8', '--config.train.steps=3', '--config.train.log_every=1',
        '--config.train.eval_batches=1', '--config.checkpoint.async_save=false',
        '--config.evaluation.sessions=0']


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """enigma_tiny trained as the README gives it: launch/run.py with the experiment's defaults
  (1800 steps), one CPU device, the population simulated into an empty cache; then --mode=eval.
  Yields the runs folder and the printed eval metrics."""
  mp = pytest.MonkeyPatch()
  mp.setenv('BRAINSCALE_DATA', str(tmp_path_factory.mktemp('data')))
  runs = tmp_path_factory.mktemp('runs')
  for mode in ('train', 'eval'):
    out = run_cli('--experiment=enigma_tiny', f'--workdir={runs / "enigma_tiny"}',
                  f'--mode={mode}', timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
  line = [x for x in out.stdout.splitlines() if x.startswith('eval step 1800 | ')][-1]
  metrics = {k: float(v) for k, v in (item.split() for item in line.split(' | ')[1:-1])}
  yield runs, metrics
  mp.undo()


def _params(workdir, config):
  setup = step_lib.build(config)
  ckpt = Checkpoints(workdir, keep=3, async_save=False)
  params = ckpt.restore(ckpt.latest(), setup.abstract_state)['params']
  ckpt.close()
  return params


@pytest.mark.slow
@pytest.mark.acceptance
def test_enigma_tiny_beats_ln_on_held_out_repeats(tiny_run):
  """enigma_tiny's quality bar on held-out repeats: cc_norm >= 0.75 and at least 0.05 above
  the LN baseline, whose own cc_norm lies between 0.2 and 0.6."""
  _, m = tiny_run
  for k in ('single_trial_corr', 'corr_to_average', 'cc_norm', 'ln_baseline_cc_norm',
            'behavior_r2'):
    assert np.isfinite(m[k]), (k, m)
  assert m['cc_norm'] >= 0.75, m
  assert m['cc_norm'] >= m['ln_baseline_cc_norm'] + 0.05, m
  assert 0.2 < m['ln_baseline_cc_norm'] < 0.6, m   # complex cells defeat the LN model


@pytest.mark.slow
@pytest.mark.acceptance
def test_a_new_session_adapts_with_the_core_frozen(tiny_run):
  """Fitting only the new session's embeddings reaches 85% of the joint CC_norm."""
  runs, joint = tiny_run
  c = config_lib.resolve('enigma_tiny_adapt', [
      '--config.checkpoint.async_save=false', '--config.train.steps=150',
      f'--config.adapt.workdir={runs / "enigma_tiny"}'])
  adapted = loop.train(c, str(runs / 'adapt'))
  assert adapted['eval_cc_norm'] >= 0.85 * joint['cc_norm'], (adapted, joint)
  base = config_lib.resolve('enigma_tiny', [])
  before = nnx.State(_params(str(runs / 'enigma_tiny'), base)['core']).flat_state()
  after = nnx.State(_params(str(runs / 'adapt'), c)['core']).flat_state()
  for (path, a), (_, b) in zip(before, after):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def _nwb_file(path, session, rate=30.0):
  """One simulated session written with pynwb's own API (traces, behaviour, stimulus, trials)."""
  f = pynwb.NWBFile(session_description='simulated V1', identifier=path.stem,
                    session_start_time=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
                    subject=pynwb.file.Subject(subject_id=path.stem, species='Mus musculus'))
  responses = session['responses']
  plane = f.create_imaging_plane(
      name='plane', optical_channel=ophys.OpticalChannel(name='green', description='g',
                                                         emission_lambda=510.0),
      description='L2/3', device=f.create_device(name='scope'), excitation_lambda=920.0,
      indicator='GCaMP6s', location='VISp', imaging_rate=rate)
  module = f.create_processing_module(name='ophys', description='calcium')
  segmentation = ophys.ImageSegmentation()
  module.add(segmentation)
  rois = segmentation.create_plane_segmentation(name='rois', description='cells',
                                                imaging_plane=plane)
  for _ in range(responses.shape[1]):
    rois.add_roi(image_mask=np.ones((2, 2)))
  region = rois.create_roi_table_region(region=list(range(responses.shape[1])), description='all')
  dff = ophys.DfOverF()
  module.add(dff)
  dff.add_roi_response_series(ophys.RoiResponseSeries(
      name='dff', data=responses, rois=region, unit='1', rate=rate, starting_time=0.0))
  behavior, times = session['behavior'], session['behavior_times']
  eye = f.create_processing_module(name='behavior', description='eye and wheel')
  eye.add(nb.EyeTracking(spatial_series=nb.SpatialSeries(
      name='pupil_position', data=behavior[:, :2], reference_frame='screen', timestamps=times)))
  eye.add(nb.PupilTracking(time_series=pynwb.TimeSeries(
      name='pupil_size', data=behavior[:, 2], unit='a.u.', timestamps=times)))
  f.add_acquisition(nb.BehavioralTimeSeries(time_series=pynwb.TimeSeries(
      name='running_speed', data=behavior[:, 4], unit='cm/s', timestamps=times)))
  f.add_stimulus(image.OpticalSeries(
      name='movie', data=session['frames'], unit='n.a.', distance=0.1, field_of_view=[0.2, 0.3],
      orientation='lower left', timestamps=session['frame_times']))
  f.add_trial_column('tier', 'store tier')
  f.add_trial_column('stimulus', 'stimulus id')
  trials = session['trials']
  for k in range(len(trials['start'])):
    f.add_trial(start_time=trials['start'][k] / rate, stop_time=trials['stop'][k] / rate,
                tier=str(trials['tier'][k]), stimulus=int(trials['stimulus'][k]))
  with pynwb.NWBHDF5IO(str(path), 'w') as io:
    io.write(f)


def test_imported_sensorium_and_nwb_sessions_train(tmp_path):
  """Both importers feed one store that enigma_tiny trains on (a few steps)."""
  spec = v1.Spec(animals=2, sessions_per_animal=1, neurons=24, train_trials=4,
                 validation_trials=2, repeat_stimuli=1, repeats=2, trial_seconds=4.0)
  store = tmp_path / 'store'
  v1.write_sensorium(tmp_path / 'mouse0', v1.simulate_session(spec, 0, 0))
  sensorium.import_sensorium(tmp_path / 'mouse0', store, progress=False)
  _nwb_file(tmp_path / 'mouse1.nwb', v1.simulate_session(spec, 1, 0))
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
