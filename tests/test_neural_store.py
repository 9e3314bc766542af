"""Neural store: alignment, write/read round trip, catalog, validation and atomic writes.

Every store is built in tmp_path from fresh random sessions made here (not the synthetic
generator); references are direct numpy computations on the arrays that were written.
"""

import json

import numpy as np
import pytest

from brainscale.data import neural
from neural_helpers import (
  FRAME_SHAPE,
  RATE,
  aligned,
  build,
  fake_session,
  frame_of_each_sample,
  timestamps,
  train_rows,
)

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

  def failing_write(path, array, chunks, real=neural.write._write_array):
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
      patch.setattr(neural.write, target, fake)
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
