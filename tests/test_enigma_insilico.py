"""In-silico experiments (enigma/insilico.py) on models whose answer is known: LN models
(enigma/baselines.py) whose filter is a Gabor of chosen centre, orientation and wavelength."""

import json

import numpy as np
import pytest

from brainscale.data.synthetic import v1, v1_files
from brainscale.enigma import baselines, insilico

H, W, T = 36, 64, 10
GABORS = [  # centre x, y (px), orientation (deg), wavelength (px), envelope sigma (px)
    dict(x=40.0, y=15.0, orientation=30.0, wavelength=12.0, sigma=5.0),
    dict(x=18.0, y=22.0, orientation=125.0, wavelength=16.0, sigma=6.0),
]


def gabor(x, y, orientation, wavelength, sigma, phase=0.3):
  """A zero-mean, unit-norm Gabor [H, W], wave vector at `orientation` (image axes)."""
  yy, xx = np.mgrid[:H, :W]
  th = np.radians(orientation)
  along = np.cos(th) * (xx - x) + np.sin(th) * (yy - y)
  envelope = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
  g = envelope * np.cos(2 * np.pi * along / wavelength + phase)
  g -= envelope * g.sum() / envelope.sum()
  return g / np.linalg.norm(g)


@pytest.fixture(scope='module')
def ln():
  """An LN model of two neurons, each a Gabor (no lags, no pooling) through a softplus."""
  w_ExN = np.concatenate([np.stack([gabor(**g).reshape(-1) for g in GABORS], 1),
                          np.zeros((1, len(GABORS)))])
  ones = np.ones(len(GABORS))
  return baselines.LN(lags=1, pool=1, w_ExN=w_ExN, a_N=ones, b_N=3 * ones, c_N=-ones,
                      ridge_N=ones)


def test_the_jax_ln_equals_the_baseline(ln):
  frames = np.random.default_rng(0).integers(0, 256, (T, H, W), dtype=np.uint8)
  got = insilico.ln_response(ln, [0, 1])(frames[None].astype(np.float32))[0]
  np.testing.assert_allclose(got, ln.predict([frames])[0], rtol=1e-4, atol=1e-5)


def test_mei_tuning_and_rf_of_gabor_neurons_recover_the_gabor(ln):
  respond = insilico.ln_response(ln, [0, 1])
  images, driven = insilico.mei(respond, (2, H, W), 2, steps=100, contrast=30.0)
  tun = insilico.tuning(respond, (T, H, W), directions=16, batch=16)
  rf = insilico.sparse_noise(respond, (2, H, W), dot=4, batch=64)
  grey = insilico.responses(respond, np.full((1, 2, H, W), insilico.GREY), settle=0)[0]
  for m, g in enumerate(GABORS):
    mei_image = images[m, 0] - insilico.GREY
    assert np.corrcoef(mei_image.reshape(-1), gabor(**g).reshape(-1))[0, 1] > 0.9
    assert driven[m] > 2 * grey[m]
    error = abs((tun.orientation[m] - g['orientation'] + 90) % 180 - 90)
    assert error < 5, (m, tun.orientation[m])
    assert tun.gosi[m] > 0.3 and tun.gdsi[m] < 0.1      # oriented; a static filter has no
    assert tun.wavelength[m] == g['wavelength']          # preferred direction
    assert np.hypot(*(rf.centre[m] - [g['x'], g['y']])) < 1.5, rf.centre[m]
  # Each MEI drives its own neuron more than the other's MEI does.
  cross = insilico.responses(respond, images, settle=0)
  assert cross[0, 0] > cross[1, 0] and cross[1, 1] > cross[0, 1]


def test_the_simulators_truth_is_what_the_experiments_find_in_its_simple_cells(tmp_path):
  """truth.json beside a store names each neuron's RF; an LN model of each simulated
  neuron's own (even) Gabor, run through the experiments, gives it back."""
  spec = v1.Spec(animals=1, sessions_per_animal=1, neurons=8, train_trials=2,
                 validation_trials=1, repeat_stimuli=1, repeats=2, trial_seconds=2.0)
  path = v1_files.write_truth(tmp_path, spec)
  truth = json.loads(path.read_text())['a0s0']
  assert set(truth) == {'unit_ids', 'centre', 'orientation', 'wavelength', 'type'}
  tun = v1.select(v1.neurons(spec, 0), v1.session_neurons(spec, 0))
  assert truth['unit_ids'] == [str(u) for u in tun['unit_ids']]
  n = len(truth['unit_ids'])
  w_ExN = np.concatenate([tun['even'].reshape(n, -1).T, np.zeros((1, n))])
  ones = np.ones(n)
  ln = baselines.LN(1, 1, w_ExN, ones, 3 * ones, -ones, ones)
  respond = insilico.ln_response(ln, np.arange(n))
  est = insilico.tuning(respond, (T, H, W), wavelengths=(10.0, 14.0, 18.0), batch=24)
  rf = insilico.sparse_noise(respond, (2, H, W), dot=2, batch=64)
  ori = insilico.angle_error(est.orientation, np.asarray(truth['orientation']))
  centre = np.linalg.norm(rf.centre - np.asarray(truth['centre']), axis=-1)
  assert np.median(ori) < 5 and np.median(centre) < 2, (ori, centre)
