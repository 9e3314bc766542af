"""Neural store windows and the Grain pipeline (values, masks, determinism, process split,
exact resume), on stores built in tmp_path from fresh random sessions."""

import numpy as np
import pytest
from absl import flags

from brainscale.data import neural
from conftest import assert_batches_equal, assert_resume_is_exact, assert_workers_match, take
from neural_helpers import RATE, aligned, build, frame_of_each_sample, train_rows

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()   # Grain reads absl flags


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
    assert_resume_is_exact(lambda: iter(make(root, seed=3)), steps, 4)


def test_worker_processes_give_the_same_batches(store):
  root, _ = store
  assert_workers_match(lambda: iter(make(root, seed=7)),
                       lambda: iter(make(root, seed=7, workers=1)), 2)


def test_pipeline_settings_errors(store):
  root, _ = store
  with pytest.raises(ValueError, match='batch_size=3 does not split over 2 processes'):
    make(root, batch_size=3, process_count=2)
  with pytest.raises(ValueError, match='min_neurons=9, max_neurons=4'):
    make(root, min_neurons=9, max_neurons=4)
  with pytest.raises(ValueError, match='no window of 100000 samples fits'):
    make(root, window=100000)
