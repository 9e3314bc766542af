"""Neural store: alignment, write/read round trip, catalog, validation, atomic writes, windows
and the Grain pipeline (values, masks, determinism, process split, exact resume).

Every store is built in tmp_path from fresh random sessions made here (not the synthetic
generator); references are direct numpy computations on the arrays that were written.
"""

import json

import numpy as np
import pytest
from absl import flags

from brainscale.data import neural

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()   # Grain reads absl flags

RATE = 30.0
FRAME_RATE = 20.0
FRAME_SHAPE = (6, 8)


def fake_session(rng, *, neurons=12, samples=None, animal='a0', units=None, tiers=None):
  """write_session's keyword arguments for a random session: responses with NaN and negative
  values, frames at FRAME_RATE with a gap, behaviour on an irregular clock with NaN, trials
  of random lengths (some gaps between them) with random tiers (at least one train)."""
  t = samples or int(rng.integers(300, 450))
  units = list(range(neurons)) if units is None else list(units)
  n = len(units)
  responses_TxN = (rng.normal(1.0, 1.5, (t, n)) * rng.uniform(0.5, 4.0, n)).astype(np.float32)
  responses_TxN[rng.random((t, n)) < 0.05] = np.nan
  frame_times_F = np.arange(-0.1, t / RATE + 0.2, 1 / FRAME_RATE)
  gap = int(rng.integers(20, len(frame_times_F) - 30))
  frame_times_F = np.delete(frame_times_F, np.arange(gap, gap + 6))   # 0.35 s without frames
  frames_FxHxW = rng.integers(0, 256, (len(frame_times_F), *FRAME_SHAPE), dtype=np.uint8)
  behavior_times_S = np.sort(rng.uniform(0.05, t / RATE - 0.05, 2 * t))   # inside the session
  behavior_SxC = rng.normal(rng.uniform(-5, 5, 5), rng.uniform(0.5, 3, 5), (2 * t, 5))
  behavior_SxC[rng.random(behavior_SxC.shape) < 0.03] = np.nan
  return dict(animal=animal, rate=RATE, responses_TxN=responses_TxN, frames_FxHxW=frames_FxHxW,
              frame_times_F=frame_times_F, behavior_SxC=behavior_SxC,
              behavior_times_S=behavior_times_S, unit_ids=[f'u{u}' for u in units],
              trials=fake_trials(rng, t, tiers), positions_Nx3=rng.uniform(0, 600, (n, 3)),
              areas=[str(a) for a in rng.choice(['V1', 'LM'], n)])


def fake_trials(rng, samples, tiers=None):
  start, stop, pos = [], [], int(rng.integers(0, 5))
  while pos + 20 <= samples:
    length = int(rng.integers(20, min(120, samples - pos) + 1))
    start.append(pos)
    stop.append(pos + length)
    pos += length + int(rng.integers(0, 8))
  tier = list(rng.choice(tiers or neural.TIERS, len(start)))
  tier[int(rng.integers(len(tier)))] = 'train'
  return {'start': np.array(start), 'stop': np.array(stop), 'tier': tier,
          'stimulus': rng.integers(0, 50, len(start))}


def build(root, rng, sessions):
  """Writes sessions {name: fake_session kwargs} and returns {name: the data written}."""
  written = {}
  for name, kwargs in sessions.items():
    written[name] = fake_session(rng, **kwargs)
    neural.write_session(root, name, **written[name])
  return written


def train_rows(data):
  t = len(data['responses_TxN'])
  rows_T = np.zeros(t, bool)
  for start, stop, tier in zip(*(data['trials'][k] for k in ('start', 'stop', 'tier'))):
    rows_T[start:stop] |= tier == 'train'
  return rows_T


def timestamps(data):
  return np.arange(len(data['responses_TxN'])) / data['rate']


def aligned(data):
  return neural.align_behavior(timestamps(data), data['behavior_times_S'], data['behavior_SxC'])


def frame_of_each_sample(data):
  """frames [T, H, W] of each neural sample (zeros where none) and which samples have one."""
  index_T = neural.nearest_frame(timestamps(data), data['frame_times_F'])
  frames_TxHxW = np.where((index_T >= 0)[:, None, None], data['frames_FxHxW'][index_T], 0)
  return frames_TxHxW.astype(np.uint8), index_T >= 0


# ---------------------------------------------------------------- alignment

def test_align_behavior_matches_interpolation_with_masked_nan(rng):
  s = int(rng.integers(20, 60))
  behavior_times_S = np.cumsum(rng.exponential(0.03, s)) + rng.uniform(-1, 1)   # irregular
  behavior_SxC = rng.normal(size=(s, 5))
  behavior_SxC[rng.random((s, 5)) < 0.15] = np.nan
  times_T = np.concatenate([rng.uniform(behavior_times_S[0] - 0.2, behavior_times_S[-1] + 0.2,
                                        500), behavior_times_S[rng.integers(0, s, 20)]])
  got_TxC = neural.align_behavior(times_T, behavior_times_S, behavior_SxC)
  assert got_TxC.shape == (len(times_T), 5) and got_TxC.dtype == np.float32
  for c in range(5):
    nan_S = np.isnan(behavior_SxC[:, c])
    value_T = np.interp(times_T, behavior_times_S, np.where(nan_S, 0, behavior_SxC[:, c]))
    touches_nan_T = np.interp(times_T, behavior_times_S, nan_S.astype(float)) > 0
    outside_T = (times_T < behavior_times_S[0]) | (times_T > behavior_times_S[-1])
    missing_T = touches_nan_T | outside_T
    np.testing.assert_array_equal(np.isnan(got_TxC[:, c]), missing_T, err_msg=f'channel {c}')
    np.testing.assert_allclose(got_TxC[~missing_T, c], value_T[~missing_T], rtol=1e-5, atol=1e-6)
  # a NaN sample spoils only the two brackets it belongs to
  k = int(rng.integers(2, s - 3))
  behavior_SxC[:, 0], behavior_SxC[k, 0] = 1.0, np.nan
  middles_S = (behavior_times_S[:-1] + behavior_times_S[1:]) / 2
  got_S = neural.align_behavior(middles_S, behavior_times_S, behavior_SxC)[:, 0]
  assert list(np.flatnonzero(np.isnan(got_S))) == [k - 1, k]
  at_samples = neural.align_behavior(behavior_times_S[k - 1:k + 2], behavior_times_S,
                                     behavior_SxC)[:, 0]
  np.testing.assert_array_equal(at_samples, [1, np.nan, 1])


def test_nearest_frame_matches_argmin_and_gives_minus_one_in_gaps(rng):
  period = rng.uniform(0.02, 0.1)
  frame_times_F = np.arange(60) * period + rng.normal(0, period * 0.05, 60) + rng.uniform(-1, 1)
  frame_times_F = np.delete(np.sort(frame_times_F), np.arange(25, 31))   # a gap of 7 periods
  times_T = np.concatenate([rng.uniform(frame_times_F[0] - 4 * period,
                                        frame_times_F[-1] + 4 * period, 800), frame_times_F[::7]])
  got_T = neural.nearest_frame(times_T, frame_times_F)
  distance_TxF = np.abs(times_T[:, None] - frame_times_F[None, :])
  expected_T = np.argmin(distance_TxF, 1)
  far_T = distance_TxF.min(1) > np.median(np.diff(frame_times_F))
  expected_T[far_T] = -1
  assert got_T.dtype == np.int32
  np.testing.assert_array_equal(got_T, expected_T)
  in_gap_T = (times_T > frame_times_F[24] + 1.6 * period) & (times_T < frame_times_F[25] - 1.6 *
                                                               period)
  assert in_gap_T.any() and (got_T[in_gap_T] == -1).all()
  assert (got_T[times_T < frame_times_F[0] - 1.1 * period] == -1).all()
  np.testing.assert_array_equal(neural.nearest_frame(times_T, []), -1)
  ties_T = neural.nearest_frame([0.5, 1.5, 2.25], [0.0, 1.0, 2.0, 3.0])
  np.testing.assert_array_equal(ties_T, [0, 1, 2])   # halfway: the earlier frame


# ---------------------------------------------------------------- write and read

def test_write_read_round_trip(tmp_path, rng):
  written = build(tmp_path, rng, {'s0': {'neurons': 9}, 's1': {'neurons': 7, 'animal': 'a1'}})
  store = neural.Store(tmp_path)
  assert store.rate == RATE and store.frame_shape == FRAME_SHAPE
  assert store.channels == neural.CHANNELS and store.animals == ['a0', 'a1']
  assert store.session_names == ['s0', 's1'] and store.num_neurons == 16
  for index, (name, data) in enumerate(written.items()):
    session = store.session(name)
    assert session is store.session(index) and session.index == index and session.name == name
    assert session.animal == data['animal'] and session.animal_index == index
    t, n = data['responses_TxN'].shape
    assert (session.num_samples, session.num_neurons, session.rate) == (t, n, RATE)
    assert session.unit_ids == data['unit_ids'] and session.areas == data['areas']
    np.testing.assert_allclose(session.positions, data['positions_Nx3'])
    for key in ('start', 'stop', 'stimulus'):
      np.testing.assert_array_equal(session.trials[key], data['trials'][key])
    assert list(session.trials['tier']) == list(data['trials']['tier'])
    train = [k for k, tier in enumerate(data['trials']['tier']) if tier == 'train']
    np.testing.assert_array_equal(session.trials_of('train'), train)
    check_stats(session, data)
    check_reads(session, data, rng)


def check_stats(session, data):
  rows_T = train_rows(data)
  responses_RxN, behavior_RxC = data['responses_TxN'][rows_T], aligned(data)[rows_T]
  np.testing.assert_allclose(session.response_mean, np.nanmean(responses_RxN, 0), rtol=1e-5)
  np.testing.assert_allclose(session.response_std, np.nanstd(responses_RxN, 0), rtol=1e-5)
  np.testing.assert_allclose(session.behavior_mean, np.nanmean(behavior_RxC, 0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(session.behavior_std, np.nanstd(behavior_RxC, 0), rtol=1e-5)
  assert session.response_std.dtype == np.float32


def check_reads(session, data, rng):
  t, n = data['responses_TxN'].shape
  frames_TxHxW, valid_T = frame_of_each_sample(data)
  assert not valid_T.all() and valid_T.any()   # the frame gap shows
  for _ in range(4):
    start = int(rng.integers(0, t - 1))
    stop = int(rng.integers(start + 1, t + 1))
    neurons = rng.choice(n, int(rng.integers(1, n + 1)), replace=False)
    got = session.read(start, stop, neurons)
    rows = slice(start, stop)
    np.testing.assert_array_equal(got['responses'], data['responses_TxN'][rows][:, neurons])
    np.testing.assert_array_equal(got['behavior'], aligned(data)[rows])
    np.testing.assert_array_equal(got['frames'], frames_TxHxW[rows])
    np.testing.assert_array_equal(got['frame_valid'], valid_T[rows])
    np.testing.assert_allclose(got['timestamps'], timestamps(data)[rows], rtol=0, atol=1e-12)
    assert got['responses'].dtype == np.float32 and got['frames'].dtype == np.uint8
    assert got['timestamps'].dtype == np.float64 and got['behavior'].dtype == np.float32
  whole = session.read(0, t)
  assert np.isnan(whole['responses']).sum() == np.isnan(data['responses_TxN']).sum() > 0
  with pytest.raises(ValueError, match='are not inside session'):
    session.read(0, t + 1)


def test_catalog_gives_one_global_index_per_animal_and_unit(tmp_path, rng):
  sessions = {'a0s0': {'units': range(0, 10)}, 'a0s1': {'units': range(6, 14)},
              'a1s0': {'units': range(0, 5), 'animal': 'a1'}}
  build(tmp_path, rng, sessions)
  store = neural.Store(tmp_path)
  first, second, other = (store.session(name) for name in sessions)
  np.testing.assert_array_equal(first.neuron_index, np.arange(10))
  np.testing.assert_array_equal(second.neuron_index, [6, 7, 8, 9, 10, 11, 12, 13])
  np.testing.assert_array_equal(other.neuron_index, np.arange(14, 19))
  assert store.num_neurons == 19 and store.animals == ['a0', 'a1']
  catalog = json.loads((tmp_path / 'catalog.json').read_text())
  assert catalog['neurons'][:14] == [['a0', f'u{u}'] for u in range(14)]
  assert catalog['neurons'][14:] == [['a1', f'u{u}'] for u in range(5)]
  assert [s['neurons'] for s in catalog['sessions']] == [10, 8, 5]
  assert [s['animal'] for s in catalog['sessions']] == ['a0', 'a0', 'a1']
  assert [s['trials'] for s in catalog['sessions']] == [len(s.trials['start']) for s in
                                                        (first, second, other)]


def test_positions_and_areas_are_optional(tmp_path, rng):
  data = {**fake_session(rng, neurons=4), 'positions_Nx3': None, 'areas': None}
  neural.write_session(tmp_path, 'x', **data)
  session = neural.Store(tmp_path).session('x')
  assert np.isnan(session.positions).all() and session.positions.shape == (4, 3)
  assert session.areas == [''] * 4


def test_stats_use_every_sample_without_train_trials(tmp_path, rng):
  data = fake_session(rng, neurons=5, tiers=['validation'])
  data['trials']['tier'] = ['validation'] * len(data['trials']['tier'])
  neural.write_session(tmp_path, 'x', **data)
  session = neural.Store(tmp_path).session('x')
  np.testing.assert_allclose(session.response_std, np.nanstd(data['responses_TxN'], 0), rtol=1e-5)
  np.testing.assert_allclose(session.behavior_mean, np.nanmean(aligned(data), 0), rtol=1e-5,
                             atol=1e-6)


# ---------------------------------------------------------------- validation

def _trials_with(data, **changes):
  return {**data['trials'], **changes}


BAD = {
    'responses 1D': (lambda d: {'responses_TxN': d['responses_TxN'][:, 0]},
                     r'responses_TxN has shape \(\d+,\); expected \[T, N\]'),
    'responses inf': (lambda d: {'responses_TxN': np.where(np.arange(len(d['unit_ids'])) == 2,
                                                           np.inf, d['responses_TxN'])},
                      r'holds \d+ infinite values'),
    'rate <= 0': (lambda d: {'rate': 0.0}, r'rate=0.0; expected a positive'),
    'unknown tier': (lambda d: {'trials': _trials_with(d, tier=['x'] * len(d['trials']['start']))},
                     r"trial tier 'x' is not one of"),
    'trial outside': (lambda d: {'trials': _trials_with(d, stop=d['trials']['stop'] + 10 ** 6)},
                      r'trial 0 is \[\d+, \d+\); expected 0 <= start < stop <= T = \d+'),
    'trial keys': (lambda d: {'trials': {k: v for k, v in d['trials'].items() if k != 'tier'}},
                   r"trials has keys \['start', 'stimulus', 'stop'\]; expected exactly"),
    'trial lengths': (lambda d: {'trials': _trials_with(d, stimulus=[1])},
                      r'trials has lengths .*; expected one equal length'),
    'frames float': (lambda d: {'frames_FxHxW': d['frames_FxHxW'].astype(np.float32)},
                     r'frames_FxHxW is float32 \(\d+, 6, 8\); expected uint8 \[F, H, W\]'),
    'frames rgb': (lambda d: {'frames_FxHxW': np.stack([d['frames_FxHxW']] * 3, -1)},
                   r'frames_FxHxW is uint8 \(\d+, 6, 8, 3\); expected uint8 \[F, H, W\]'),
    'frame times': (lambda d: {'frame_times_F': d['frame_times_F'][1:]},
                    r'frame_times_F has \d+ times for \d+ frames'),
    'frame order': (lambda d: {'frame_times_F': d['frame_times_F'][::-1]},
                    r'frame_times_F is not strictly increasing'),
    'channels': (lambda d: {'behavior_SxC': d['behavior_SxC'][:, :4]},
                 r'behavior_SxC has shape \(\d+, 4\); expected \[S, 5\]'),
    'behaviour times': (lambda d: {'behavior_times_S': d['behavior_times_S'][:-1]},
                        r'behavior_SxC has shape \(\d+, 5\); expected \[\d+, C\]'),
    'unit count': (lambda d: {'unit_ids': d['unit_ids'][:-1]},
                   r'unit_ids has \d+ ids for \d+ neurons'),
    'unit twice': (lambda d: {'unit_ids': [d['unit_ids'][0]] * len(d['unit_ids'])},
                   r"unit id 'u0' appears twice"),
    'positions': (lambda d: {'positions_Nx3': d['positions_Nx3'][:, :2]},
                  r'positions_Nx3 has shape \(\d+, 2\); expected \(\d+, 3\)'),
    'areas': (lambda d: {'areas': ['V1']}, r'areas has 1 entries for \d+ neurons'),
    'name': (lambda d: {'name': '../up'}, r"session name '../up' is not a plain folder name"),
    'store rate': (lambda d: {'rate': 60.0}, r"rate=60.0 Hz differs from the store's 30.0 Hz"),
    'store frames': (lambda d: {'frames_FxHxW': d['frames_FxHxW'][:, :5]},
                     r'frames are \(5, 8\); the store .* holds frames \(6, 8\)'),
    'exists': (lambda d: {'name': 'first'},
               r"session 'first' already exists in .*; pass overwrite=True"),
}


@pytest.mark.parametrize('kind', list(BAD))
def test_invalid_sessions_are_one_line_errors(tmp_path, rng, kind):
  neural.write_session(tmp_path, 'first', **fake_session(rng, neurons=4))
  before = sorted(p.name for p in tmp_path.iterdir()), (tmp_path / 'catalog.json').read_bytes()
  data = fake_session(rng, neurons=4)
  change, message = BAD[kind]
  arguments = {'name': 'second', **data, **change(data)}
  with pytest.raises(ValueError, match=message) as error:
    neural.write_session(tmp_path, arguments.pop('name'), **arguments)
  assert '\n' not in str(error.value)
  assert (sorted(p.name for p in tmp_path.iterdir()),
          (tmp_path / 'catalog.json').read_bytes()) == before


def test_a_folder_without_catalog_says_how_to_make_a_store(tmp_path):
  with pytest.raises(FileNotFoundError, match='catalog.json not found.*importer.*synthetic'):
    neural.Store(tmp_path)


def test_an_exception_mid_write_leaves_the_store_as_it_was(tmp_path, rng, monkeypatch):
  written = build(tmp_path, rng, {'s0': {'neurons': 5}})
  catalog = (tmp_path / 'catalog.json').read_bytes()
  calls = []

  def failing_write(path, array, chunks, real=neural._write_array):
    calls.append(path.name)
    if len(calls) == 3:
      raise OSError('disk full')
    real(path, array, chunks)

  def failing_catalog(root, catalog):
    raise OSError('disk full')

  replacement = fake_session(rng, neurons=6)
  for name, (target, fake) in [('s1', ('_write_array', failing_write)),
                               ('s1', ('_write_catalog', failing_catalog)),
                               ('s0', ('_write_catalog', failing_catalog))]:
    with monkeypatch.context() as patch:
      patch.setattr(neural, target, fake)
      with pytest.raises(OSError, match='disk full'):
        neural.write_session(tmp_path, name, **replacement, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['catalog.json', 's0']
    assert (tmp_path / 'catalog.json').read_bytes() == catalog
    session = neural.Store(tmp_path).session('s0')
    np.testing.assert_array_equal(session.read(0, 50)['responses'],
                                  written['s0']['responses_TxN'][:50])
  assert len(calls) == 3
  neural.write_session(tmp_path, 's0', **replacement, overwrite=True)
  session = neural.Store(tmp_path).session('s0')
  assert session.num_neurons == 6 and sorted(p.name for p in tmp_path.iterdir()) == [
      'catalog.json', 's0']
  np.testing.assert_array_equal(session.read(0, 50)['responses'],
                                replacement['responses_TxN'][:50])


# ---------------------------------------------------------------- windows

def test_windows_lie_inside_trials_of_the_chosen_tiers_and_sessions(tmp_path, rng):
  build(tmp_path, rng, {name: {'neurons': 3} for name in ('s0', 's1', 's2')})
  store = neural.Store(tmp_path)
  window, stride = int(rng.integers(10, 40)), int(rng.integers(1, 15))
  tiers, sessions = ('train', 'repeats'), ['s2', 's0']
  index = neural.windows(store, tiers=tiers, window=window, stride=stride, sessions=sessions)
  expected = []
  for name in sessions:
    session = store.session(name)
    for k, (start, stop, tier) in enumerate(zip(*(session.trials[key] for key in
                                                  ('start', 'stop', 'tier')))):
      if tier in tiers:
        expected += [(session.index, k, s) for s in range(start, stop - window + 1, stride)]
  assert len(index) == len(expected) > 0 and list(index) == expected
  assert index[-1] == expected[-1]
  trials = sum(len(store.session(name).trials['start']) for name in sessions)
  assert len(index.end_K) <= trials < len(index)   # per-trial arrays, not per-window
  assert len(neural.windows(store, tiers='train', window=10 ** 6, stride=1)) == 0
  with pytest.raises(ValueError, match=r"sessions \['nope'\] are not in"):
    neural.windows(store, tiers=tiers, window=window, stride=stride, sessions=['s0', 'nope'])
  with pytest.raises(ValueError, match=r"tiers \['training'\] must be a non-empty selection"):
    neural.windows(store, tiers=['training'], window=window, stride=stride)
  with pytest.raises(IndexError, match='out of range'):
    index[len(index)]


# ---------------------------------------------------------------- pipeline

SETTINGS = dict(seed=0, batch_size=4, process_index=0, process_count=1, window=16, stride=8,
                tiers=('train', 'validation'), max_neurons=16, min_neurons=5)


@pytest.fixture
def store(tmp_path, rng):
  """Three sessions (3, 12 and 24 neurons; two animals) and the data written to them."""
  sessions = {'s0': {'neurons': 3}, 's1': {'neurons': 12},
              's2': {'neurons': 24, 'animal': 'a1'}}
  return tmp_path, build(tmp_path, rng, sessions)


def make(root, **kwargs):
  return neural.pipeline(root, **{**SETTINGS, **kwargs})


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def expected_example(store, written, batch, b):
  """Example b of a batch recomputed from the arrays written and the neurons it names."""
  session = store.session(int(batch['session'][b]))
  data, start = written[session.name], int(batch['start'][b])
  w, m = batch['times'].shape[1], batch['neurons'].shape[1]
  n = int(batch['neuron_mask'][b].sum())
  local = {int(g): i for i, g in enumerate(session.neuron_index)}
  neurons = [local[int(g)] for g in batch['neurons'][b, :n]]
  rows_T, rows = train_rows(data), slice(start, start + w)
  scaled_Wxn = data['responses_TxN'][rows][:, neurons] / np.nanstd(
      data['responses_TxN'][rows_T][:, neurons], 0)
  behavior_TxC = aligned(data)
  zscored_WxC = (behavior_TxC[rows] - np.nanmean(behavior_TxC[rows_T], 0)) / np.nanstd(
      behavior_TxC[rows_T], 0)
  frames_TxHxW, valid_T = frame_of_each_sample(data)
  pad = ((0, 0), (0, m - n))
  return neurons, {
      'responses': np.pad(np.where(np.isnan(scaled_Wxn), 0, np.maximum(scaled_Wxn, 0)), pad),
      'responses_mask': np.pad(~np.isnan(scaled_Wxn), pad),
      'neurons': np.pad(session.neuron_index[neurons], (0, m - n)),
      'neuron_mask': np.arange(m) < n, 'animal': session.animal_index,
      'behavior': np.nan_to_num(zscored_WxC), 'behavior_mask': ~np.isnan(zscored_WxC),
      'frames': frames_TxHxW[rows], 'frames_mask': valid_T[rows],
      'times': np.arange(w) / RATE}


def check_batch(store, written, batch, index):
  """Checks every example of a batch; returns their (session, neuron count)."""
  exact = {'neurons', 'neuron_mask', 'responses_mask', 'behavior_mask', 'frames', 'frames_mask',
           'animal'}
  counts, windows = [], set(index)
  for b in range(len(batch['session'])):
    neurons, expected = expected_example(store, written, batch, b)
    counts.append((int(batch['session'][b]), len(neurons)))
    assert tuple(int(batch[k][b]) for k in ('session', 'trial', 'start')) in windows
    for key, value in expected.items():
      if key in exact:
        np.testing.assert_array_equal(batch[key][b], value, err_msg=key)
      else:
        np.testing.assert_allclose(batch[key][b], value, rtol=2e-5, atol=1e-5, err_msg=key)
  return counts


def test_pipeline_batches_match_the_data_written(store):
  root, written = store
  st = neural.Store(root)
  index = neural.windows(st, tiers=SETTINGS['tiers'], window=16, stride=8)
  batches = take(iter(make(root, seed=11, batch_size=8)), 6)
  shapes = {'responses': ((8, 16, 16), np.float32), 'responses_mask': ((8, 16, 16), bool),
            'neurons': ((8, 16), np.int32), 'neuron_mask': ((8, 16), bool),
            'positions': ((8, 16, 3), np.float32),
            'session': ((8,), np.int32), 'animal': ((8,), np.int32),
            'frames': ((8, 16, 6, 8), np.uint8), 'frames_mask': ((8, 16), bool),
            'behavior': ((8, 16, 5), np.float32), 'behavior_mask': ((8, 16, 5), bool),
            'times': ((8, 16), np.float32), 'trial': ((8,), np.int32), 'start': ((8,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batches[0].items()} == shapes
  counts = sum((check_batch(st, written, batch, index) for batch in batches), [])
  bounds = {0: (3, 3), 1: (5, 12), 2: (5, 16)}   # [min(5, N), min(16, N)]
  assert all(bounds[s][0] <= n <= bounds[s][1] for s, n in counts)
  assert len({n for s, n in counts if s > 0}) > 3   # counts are drawn
  stacked = {k: np.concatenate([b[k] for b in batches]) for k in ('responses_mask', 'neuron_mask',
                                                                   'behavior_mask', 'frames_mask')}
  real_BxWxM = np.broadcast_to(stacked['neuron_mask'][:, None, :], stacked['responses_mask'].shape)
  assert stacked['responses_mask'][real_BxWxM].mean() < 1   # NaN samples are masked
  assert not stacked['responses_mask'][~real_BxWxM].any()   # and padding
  assert not stacked['behavior_mask'].all() and stacked['behavior_mask'].any()
  assert (batches[0]['responses'] >= 0).all()


def test_positions_are_in_stds_of_their_session_and_zero_for_padding(store):
  root, _ = store
  st = neural.Store(root)
  for name in st.session_names:
    session = st.session(name)
    pos_Nx3 = session.positions
    ok = np.isfinite(pos_Nx3)
    mean, std = np.nanmean(pos_Nx3, 0), np.nanstd(pos_Nx3, 0)
    expected = np.where(ok & (std > 1e-6), (pos_Nx3 - mean) / np.where(std > 1e-6, std, 1), 0)
    n = session.num_neurons
    example = neural.example(session, 0, 4, neurons=np.arange(n), max_neurons=n + 2)
    np.testing.assert_allclose(example['positions'][:n], expected, rtol=1e-5, atol=1e-5)
    assert (example['positions'][n:] == 0).all()


def test_eval_pipeline_takes_the_first_neurons_of_windows_in_order(store):
  root, written = store
  st = neural.Store(root)
  index = neural.windows(st, tiers=('validation',), window=16, stride=8)
  batch = next(iter(make(root, tiers=('validation',), train=False, batch_size=6)))
  assert [tuple(int(batch[k][b]) for k in ('session', 'trial', 'start'))
          for b in range(6)] == [index[i] for i in range(6)]
  for b in range(6):
    session = st.session(int(batch['session'][b]))
    neurons, _ = expected_example(st, written, batch, b)
    assert neurons == list(range(min(16, session.num_neurons)))
    single = neural.example(session, int(batch['start'][b]), 16, neurons=neurons, max_neurons=16)
    assert single.keys() == batch.keys()
    for key in batch:   # the helper makes the same example, finding its trial itself
      np.testing.assert_array_equal(single[key], batch[key][b], err_msg=key)
  check_batch(st, written, batch, index)
  with pytest.raises(ValueError, match='17 neurons do not fit max_neurons=16'):
    neural.example(st.session('s2'), 0, 16, neurons=np.arange(17), max_neurons=16)


def test_same_seed_same_batches_and_processes_split_the_stream(store):
  root, _ = store
  first = take(iter(make(root, seed=4)), 3)
  assert_batches_equal(take(iter(make(root, seed=4)), 3), first)
  other = take(iter(make(root, seed=5)), 3)
  assert any((a['start'] != b['start']).any() for a, b in zip(first, other))
  whole = list(make(root, seed=4, num_epochs=1))
  parts = [list(make(root, seed=4, process_index=p, process_count=2, num_epochs=1))
           for p in range(2)]
  assert len(parts[0]) >= len(parts[1]) == len(whole) > 3
  seen = [{(int(b['session'][i]), int(b['start'][i])) for b in part for i in range(2)}
          for part in parts]
  assert not seen[0] & seen[1]
  assert [len(s) for s in seen] == [2 * len(part) for part in parts]   # each window once
  for batch, b0, b1 in zip(whole, *parts):
    for key in batch:
      np.testing.assert_array_equal(batch[key][0::2], b0[key], err_msg=key)
      np.testing.assert_array_equal(batch[key][1::2], b1[key], err_msg=key)


def test_resume_mid_epoch_and_across_epochs_is_exact(store):
  root, _ = store
  epoch = len(neural.windows(neural.Store(root), tiers=SETTINGS['tiers'], window=16,
                            stride=8)) // 4
  for steps in (2, epoch - 1):   # the second run crosses into the next epoch
    it = iter(make(root, seed=3))
    take(it, steps)
    state = it.get_state()
    expected = take(it, 4)
    resumed = iter(make(root, seed=3))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), expected)


def test_worker_processes_give_the_same_batches(store):
  root, _ = store
  expected = take(iter(make(root, seed=7)), 4)
  it = iter(make(root, seed=7, workers=1))
  assert_batches_equal(take(it, 2), expected[:2])
  state = it.get_state()
  resumed = iter(make(root, seed=7, workers=1))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 2), expected[2:])


def test_pipeline_settings_errors(store):
  root, _ = store
  with pytest.raises(ValueError, match='batch_size=3 does not split over 2 processes'):
    make(root, batch_size=3, process_count=2)
  with pytest.raises(ValueError, match='min_neurons=9, max_neurons=4'):
    make(root, min_neurons=9, max_neurons=4)
  with pytest.raises(ValueError, match='no window of 100000 samples fits'):
    make(root, window=100000)
