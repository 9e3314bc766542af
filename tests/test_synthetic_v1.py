"""Simulated V1: determinism, shapes, shared neurons, the known answers (rates), tuning
(simple vs complex cells, running gain), noise ceiling, and the files it writes.

Each test draws its population from the seed of its own node id (conftest `seed`).
"""

import dataclasses
import json

import numpy as np
import pytest

from brainscale.data.synthetic import v1, v1_files


def small(seed, **changes) -> v1.Spec:
  """A spec that simulates in well under a second per session."""
  base = dict(animals=2, sessions_per_animal=2, neurons=12, shared=0.5, train_trials=3,
              validation_trials=1, repeat_stimuli=2, repeats=3, trial_seconds=3.0, seed=seed)
  return v1.Spec(**{**base, **changes})


def trial_block(session, array_TxN, k):
  trials = session['trials']
  return array_TxN[trials['start'][k]:trials['stop'][k]]


def repeats_of(session, stimulus_id) -> list[int]:
  trials = session['trials']
  return [k for k, (tier, s) in enumerate(zip(trials['tier'], trials['stimulus']))
          if tier == 'repeats' and s == stimulus_id]


def at_rest(samples) -> np.ndarray:
  """Behaviour [T, 5] with running speed and pupil size at their population means (gain 1)."""
  behavior_TxC = np.zeros((samples, 5), np.float32)
  behavior_TxC[:, v1.CHANNELS.index('running_speed')] = v1.RUNNING_MEAN
  behavior_TxC[:, v1.CHANNELS.index('pupil_size')] = v1.PUPIL_MEAN
  return behavior_TxC


def grating(spec, tuning, i, *, amplitude, seconds=3.0, frequency=2.0) -> np.ndarray:
  """uint8 [T, H, W]: a grating at neuron i's orientation and wavelength drifting at `frequency`."""
  h, w = spec.frame_shape
  t_T = np.arange(int(seconds * spec.rate)) / spec.rate
  y_HxW, x_HxW = np.mgrid[:h, :w]
  theta, wavelength = tuning['orientation'][i], tuning['wavelength'][i]
  along_HxW = np.cos(theta) * x_HxW + np.sin(theta) * y_HxW
  phase_TxHxW = 2 * np.pi * (along_HxW[None] / wavelength - frequency * t_T[:, None, None])
  return np.round(128 + amplitude * np.cos(phase_TxHxW)).astype(np.uint8)


def test_spec_rejects_bad_values():
  with pytest.raises(ValueError, match="noise='gaussian'"):
    v1.Spec(noise='gaussian')
  with pytest.raises(ValueError, match='shared=1.5'):
    v1.Spec(shared=1.5)


def test_same_spec_same_session_and_other_seed_differs(seed):
  spec = small(seed)
  first, again = v1.simulate_session(spec, 1, 0), v1.simulate_session(spec, 1, 0)
  for key in ('responses', 'rates', 'frames', 'behavior', 'behavior_times', 'positions'):
    np.testing.assert_array_equal(first[key], again[key], err_msg=key)
  assert first['trials']['tier'] == again['trials']['tier']
  other = v1.simulate_session(dataclasses.replace(spec, seed=seed + 1), 1, 0)
  assert not np.array_equal(first['frames'], other['frames'])
  assert not np.array_equal(first['rates'], other['rates'])


def test_repeats_show_identical_frames_and_get_different_responses(seed):
  spec = small(seed, repeats=4)
  a, b = v1.simulate_session(spec, 0, 1), v1.simulate_session(spec, 1, 0)
  shown = [trial_block(s, s['frames'], k) for s in (a, b) for k in repeats_of(s, 1)]
  assert len(shown) == 2 * spec.repeats
  for frames_TxHxW in shown[1:]:
    np.testing.assert_array_equal(frames_TxHxW, shown[0])
  first, second = repeats_of(a, 1)[:2]
  assert not np.array_equal(trial_block(a, a['responses'], first),
                            trial_block(a, a['responses'], second))
  assert not np.array_equal(trial_block(a, a['rates'], first),
                            trial_block(a, a['rates'], second))   # fresh behaviour
  fresh = [s for s, tier in zip(a['trials']['stimulus'], a['trials']['tier']) if tier != 'repeats']
  assert len(set(fresh)) == len(fresh) and min(fresh) >= spec.repeat_stimuli


def test_shapes_dtypes_and_tier_counts(seed):
  spec = small(seed)
  session = v1.simulate_session(spec, 0, 1)
  t, n = spec.trials * spec.trial_samples, spec.neurons
  h, w = spec.frame_shape
  expected = {'responses': ((t, n), np.float32), 'rates': ((t, n), np.float32),
              'frames': ((t, h, w), np.uint8), 'frame_times': ((t,), np.float64),
              'positions': ((n, 3), np.float32)}
  for key, (shape, dtype) in expected.items():
    assert session[key].shape == shape and session[key].dtype == dtype, key
  s = len(session['behavior_times'])
  assert session['behavior'].shape == (s, 5) and session['behavior'].dtype == np.float32
  assert len(session['unit_ids']) == n and session['areas'] == ['V1'] * n
  trials = session['trials']
  counts = {tier: trials['tier'].count(tier) for tier in ('train', 'validation', 'repeats')}
  assert counts == {'train': 3, 'validation': 1, 'repeats': 6}
  np.testing.assert_array_equal(trials['start'], np.arange(spec.trials) * spec.trial_samples)
  np.testing.assert_array_equal(trials['stop'][:-1], trials['start'][1:])
  assert trials['stop'][-1] == t and trials['tier'] != sorted(trials['tier'])   # shuffled


def test_behavior_clock_and_channels(seed):
  spec = small(seed, trial_seconds=20.0)
  session = v1.simulate_session(spec, 1, 1)
  times_S, behavior_SxC = session['behavior_times'], session['behavior']
  np.testing.assert_allclose(np.diff(times_S), 1 / spec.behavior_rate)
  assert times_S[0] < 0 and times_S[-1] > session['frame_times'][-1]
  neural_clock_S = times_S * spec.rate
  assert np.abs(neural_clock_S - np.round(neural_clock_S)).min() > 1e-3   # an offset clock
  size_S, running_S = behavior_SxC[:, 2], behavior_SxC[:, 4]
  assert running_S.min() >= 0 and running_S.max() > 5 and np.isfinite(behavior_SxC).all()
  assert np.corrcoef(size_S, running_S)[0, 1] > 0.2
  np.testing.assert_allclose(behavior_SxC[:, 3], np.gradient(size_S, 1 / spec.behavior_rate),
                             rtol=1e-4, atol=1e-3)


def test_stimulus_is_pink_and_jumps_every_one_to_two_seconds(seed):
  spec = small(seed, trial_seconds=10.0)
  video_TxHxW = v1.stimulus(spec, 17).astype(np.float64)
  power_HxW = np.abs(np.fft.fft2(video_TxHxW - video_TxHxW.mean((1, 2), keepdims=True))) ** 2
  fy, fx = np.meshgrid(np.fft.fftfreq(spec.frame_shape[0]), np.fft.fftfreq(spec.frame_shape[1]),
                       indexing='ij')
  f = np.hypot(fy, fx)
  band = (f > 0.03) & (f < 0.3)
  slope = np.polyfit(np.log(f[band]), np.log(power_HxW.mean(0)[band]), 1)[0]
  assert -2.8 < slope < -1.2, slope   # 1/f amplitude: power ~ f^-2
  change_T = np.abs(np.diff(video_TxHxW, axis=0)).mean((1, 2))
  jumps = np.sum(change_T > 15)   # grey levels per pixel: a new image; drift changes ~3-8
  assert 4 <= jumps <= 9, jumps


def test_shared_neurons_keep_unit_id_and_tuning_and_animals_share_none(seed):
  spec = small(seed, neurons=16, shared=0.25)
  units = {(a, s): v1.simulate_session(spec, a, s) for a in range(2) for s in range(2)}
  for a in range(2):
    ids = [set(units[a, s]['unit_ids']) for s in range(2)]
    assert len(ids[0] & ids[1]) == spec.shared_neurons == 4
    pool = v1.neurons(spec, a)
    for s in range(2):
      session = units[a, s]
      np.testing.assert_array_equal(pool['unit_ids'][session['pool_index']], session['unit_ids'])
      np.testing.assert_array_equal(pool['positions'][session['pool_index']], session['positions'])
    again = v1.neurons(spec, a)
    for key, value in pool.items():
      np.testing.assert_array_equal(value, again[key], err_msg=key)
  animal_ids = [set(units[a, 0]['unit_ids']) | set(units[a, 1]['unit_ids']) for a in range(2)]
  assert not animal_ids[0] & animal_ids[1]
  assert not np.allclose(v1.neurons(spec, 0)['even'], v1.neurons(spec, 1)['even'])


def test_poisson_responses_average_to_the_rates(seed):
  spec = small(seed, trial_seconds=10.0, neurons=24)
  session = v1.simulate_session(spec, 0, 0)
  responses_TxN, rates_TxN = session['responses'], session['rates']
  assert np.all(responses_TxN == np.round(responses_TxN)) and responses_TxN.min() >= 0
  assert 0.2 < rates_TxN.mean() < 1.2
  t = len(rates_TxN)
  z_N = (responses_TxN.mean(0) - rates_TxN.mean(0)) / np.sqrt(rates_TxN.mean(0) / t)
  assert np.abs(z_N).max() < 5, z_N
  total = (responses_TxN.sum() - rates_TxN.sum()) / np.sqrt(rates_TxN.sum())
  assert abs(total) < 5
  fano = np.var(responses_TxN - rates_TxN) / rates_TxN.mean()
  assert 0.9 < fano < 1.1


def test_calcium_responses_are_spikes_through_the_kernel_plus_noise(seed):
  spec = small(seed, noise='calcium', trial_seconds=10.0)
  session = v1.simulate_session(spec, 0, 0)
  responses_TxN, expected_TxN = session['responses'], session['rates']
  d = np.exp(-1 / (spec.calcium_tau * spec.rate))
  reference_TxN = np.zeros_like(session['spike_rates'], np.float64)
  for t, rate_N in enumerate(session['spike_rates']):
    reference_TxN[t] = rate_N + (d * reference_TxN[t - 1] if t else 0)
  np.testing.assert_allclose(expected_TxN, reference_TxN, rtol=1e-4, atol=1e-4)
  assert responses_TxN.min() < 0 < responses_TxN.max()   # gaussian noise on top
  t = len(expected_TxN)
  spread_N = np.sqrt(expected_TxN.mean(0) / (1 - d) / t * 3)   # generous: correlated samples
  assert np.all(np.abs(responses_TxN.mean(0) - expected_TxN.mean(0)) < 5 * spread_N)


def test_simple_cells_follow_their_gabor_and_complex_cells_do_not(seed):
  spec = small(seed, neurons=40, trial_seconds=10.0, complex_fraction=0.5)
  session = v1.simulate_session(spec, 0, 0)
  tuning = v1.select(v1.neurons(spec, 0), session['pool_index'])
  even_TxN, _ = v1.linear_drive(tuning, session['frames'])
  rates_TxN = session['spike_rates']
  corr_N = np.array([np.corrcoef(e, r)[0, 1] for e, r in zip(even_TxN.T, rates_TxN.T)])
  simple, complex_ = corr_N[~tuning['complex']], corr_N[tuning['complex']]
  assert len(simple) and len(complex_)
  assert np.median(simple) > 0.5 and np.median(complex_) < 0.3
  assert np.median(simple) > np.median(complex_) + 0.4


def test_drifting_grating_modulates_simple_cells_not_complex_cells(seed):
  spec = small(seed)
  tuning = v1.neurons(spec, 0)
  ratio_P = []
  for i in range(12):
    frames_TxHxW = grating(spec, tuning, i, amplitude=12)
    rate_T = v1.rates(spec, v1.select(tuning, [i]), frames_TxHxW, at_rest(len(frames_TxHxW)))
    last_T = rate_T[-int(spec.rate):, 0].astype(np.float64)   # one second: two cycles
    t_T = np.arange(len(last_T)) / spec.rate
    f1 = 2 * np.abs(np.mean(last_T * np.exp(-2j * np.pi * 2.0 * t_T)))
    ratio_P.append(f1 / last_T.mean())
  ratio_P = np.array(ratio_P)
  complex_P = tuning['complex'][:12]
  assert np.all(ratio_P[~complex_P] > 0.8), ratio_P
  assert np.all(ratio_P[complex_P] < 0.2), ratio_P


def test_running_raises_the_gain_of_neurons_with_positive_coefficient(seed):
  spec = small(seed)
  tuning = v1.neurons(spec, 1)
  frames_TxHxW = v1.stimulus(spec, 5)
  still_TxC, running_TxC = at_rest(len(frames_TxHxW)), at_rest(len(frames_TxHxW))
  still_TxC[:, 4], running_TxC[:, 4] = 0.0, 25.0
  ratio_TxP = (v1.rates(spec, tuning, frames_TxHxW, running_TxC)
               / v1.rates(spec, tuning, frames_TxHxW, still_TxC))
  up = tuning['running'] > 0
  assert up.any() and (~up).any()
  assert np.all(ratio_TxP[:, up] > 1) and np.all(ratio_TxP[:, ~up] < 1)
  running_z, _ = v1.behavior_z(running_TxC[:1])
  still_z, _ = v1.behavior_z(still_TxC[:1])
  np.testing.assert_allclose(ratio_TxP[0], np.exp(tuning['running'] * (running_z - still_z)),
                             rtol=1e-4)


def test_repeats_have_a_high_noise_ceiling(seed):
  spec = small(seed, neurons=24, repeat_stimuli=4, repeats=4, trial_seconds=6.0)
  session = v1.simulate_session(spec, 1, 1)
  ceiling, single = [], []
  for stimulus_id in range(spec.repeat_stimuli):
    trials = repeats_of(session, stimulus_id)
    rates_RxTxN = np.stack([trial_block(session, session['rates'], k) for k in trials])
    responses_RxTxN = np.stack([trial_block(session, session['responses'], k) for k in trials])
    half_a, half_b = rates_RxTxN[:2].mean(0), rates_RxTxN[2:].mean(0)
    for n in range(spec.neurons):
      ceiling.append(np.corrcoef(half_a[:, n], half_b[:, n])[0, 1])
      single.append(np.corrcoef(responses_RxTxN[0, :, n], rates_RxTxN[0, :, n])[0, 1])
  assert np.mean(ceiling) > 0.9 and np.mean(single) > 0.25, (np.mean(ceiling), np.mean(single))


def test_write_sensorium_writes_the_documented_files(seed, tmp_path):
  spec = small(seed)
  session = v1.simulate_session(spec, 1, 0)
  v1_files.write_sensorium(tmp_path, session)
  h, w = spec.frame_shape
  t, n = spec.trial_samples, spec.neurons
  for k in range(spec.trials):
    video = np.load(tmp_path / f'data/videos/{k}.npy')
    assert video.shape == (h, w, t)
    np.testing.assert_array_equal(np.moveaxis(video, -1, 0),
                                  trial_block(session, session['frames'], k))
    responses = np.load(tmp_path / f'data/responses/{k}.npy')
    np.testing.assert_array_equal(responses.T, trial_block(session, session['responses'], k))
    assert np.load(tmp_path / f'data/behavior/{k}.npy').shape == (2, t)
    assert np.load(tmp_path / f'data/pupil_center/{k}.npy').shape == (2, t)
  behavior = np.load(tmp_path / 'data/behavior/0.npy')
  times = session['frame_times'][:t]
  np.testing.assert_allclose(behavior[1], np.interp(times, session['behavior_times'],
                                                    session['behavior'][:, 4]), rtol=1e-5)
  unit_ids = np.load(tmp_path / 'meta/neurons/unit_ids.npy')
  assert [str(u) for u in unit_ids] == session['unit_ids']
  assert np.load(tmp_path / 'meta/neurons/cell_motor_coordinates.npy').shape == (n, 3)
  tiers = np.load(tmp_path / 'meta/trials/tiers.npy').tolist()
  assert tiers == [v1_files.SENSORIUM_TIERS[tier] for tier in session['trials']['tier']]
  assert tiers.count('oracle') == 6 and tiers.count('live_test_main') == 1


def test_sensorium_folder_imports_back_to_the_same_session(seed, tmp_path):
  neural = pytest.importorskip('brainscale.data.neural')
  sensorium = pytest.importorskip('brainscale.data.importers.sensorium')
  spec = small(seed, animals=1, sessions_per_animal=1)
  session = v1.simulate_session(spec, 0, 0)
  v1_files.write_sensorium(tmp_path / 'mouse', session)
  name = sensorium.import_sensorium(tmp_path / 'mouse', tmp_path / 'store', progress=False)
  imported = neural.Store(tmp_path / 'store').session(name)
  read = imported.read(0, imported.num_samples)
  np.testing.assert_array_equal(read['responses'], session['responses'])
  np.testing.assert_array_equal(read['frames'], session['frames'])
  assert imported.unit_ids == session['unit_ids']
  same = lambda ids: [[a == b for b in ids] for a in ids]   # which trials show one stimulus
  assert same(imported.trials['stimulus'].tolist()) == same(session['trials']['stimulus'].tolist())


def test_generate_writes_a_store_with_one_index_per_shared_neuron(seed, tmp_path):
  neural = pytest.importorskip('brainscale.data.neural')
  spec = small(seed, neurons=10, shared=0.4)
  names = v1_files.generate(tmp_path / 'store', spec)
  assert names == ['a0s0', 'a0s1', 'a1s0', 'a1s1']
  store = neural.Store(tmp_path / 'store')
  assert store.session_names == names and store.animals == ['a0', 'a1']
  assert store.num_neurons == spec.animals * spec.pool == 2 * (4 + 2 * 6)
  assert tuple(store.frame_shape) == spec.frame_shape and store.rate == spec.rate
  for a in range(2):
    first, second = store.session(f'a{a}s0'), store.session(f'a{a}s1')
    index = {u: i for u, i in zip(first.unit_ids, first.neuron_index)}
    shared = [(index[u], i) for u, i in zip(second.unit_ids, second.neuron_index) if u in index]
    assert len(shared) == 4 and all(i == j for i, j in shared)
    assert len(set(first.neuron_index) | set(second.neuron_index)) == spec.pool
  session = v1.simulate_session(spec, 1, 1)
  read = store.session('a1s1').read(0, 2 * spec.trial_samples)
  np.testing.assert_array_equal(read['responses'], session['responses'][:2 * spec.trial_samples])
  np.testing.assert_array_equal(read['frames'], session['frames'][:2 * spec.trial_samples])
  assert read['frame_valid'].all() and np.isfinite(read['behavior']).all()
  assert store.session('a1s1').trials['tier'].tolist() == session['trials']['tier']
  # truth.json beside the store: each session's neurons in its order, with their true RFs
  truth = json.loads((tmp_path / 'store' / v1.TRUTH_FILE).read_text())
  assert sorted(truth) == names
  for name in names:
    assert truth[name]['unit_ids'] == store.session(name).unit_ids
  tuning = v1.select(v1.neurons(spec, 1), v1.session_neurons(spec, 1))
  np.testing.assert_allclose(truth['a1s1']['centre'], tuning['centre'], atol=1e-3)
  assert truth['a1s1']['type'] == ['complex' if c else 'simple' for c in tuning['complex']]


@pytest.mark.slow
def test_enigma_tiny_trains_on_the_default_spec_from_the_data_cache():
  """enigma_tiny's population is the default spec, as its runs get it: from the data cache,
  which the first run that asks for it (in a test run: this test or another) simulates with
  this code (the cache's name hashes the generator's source). Its time: benchmarks/RESULTS.md,
  "Enigma tiny on CPU"."""
  neural = pytest.importorskip('brainscale.data.neural')
  from brainscale import config as config_lib  # noqa: PLC0415
  from brainscale.data import cache  # noqa: PLC0415
  from brainscale.enigma import data  # noqa: PLC0415
  c = config_lib.resolve('enigma_tiny', [])
  spec = v1.Spec()
  assert cache.spec_of(c.data.synthetic, v1.Spec) == spec
  store = neural.Store(data.store_root(c))
  assert sorted(store.session_names) == sorted(f'a{a}s{s}' for a in range(3) for s in range(2))
  assert store.num_neurons == 3 * (32 + 2 * 32)
  assert store.session('a2s1').num_samples == spec.trials * 300 == 152 * 300
  assert store.session('a2s1').num_neurons == 64
