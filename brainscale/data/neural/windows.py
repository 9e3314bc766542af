"""Training windows of a neural store, and the Grain pipeline of their examples.

Example i of a pipeline is a pure function of (seed, i); arrays are read lazily, per window.
"""

import operator

import grain
import numpy as np

from brainscale.data import batches
from brainscale.data.neural.store import TIERS, Session, Store, checked_tiers

# ---------------------------------------------------------------- windows

class WindowIndex:
  """Every window [start, start + window) inside a trial, addressed by one integer.

  Holds per-trial arrays only (session, trial, first start, cumulative window count):
  memory O(trials). index[i] -> (session_index, trial, start).
  """

  def __init__(self, window: int, stride: int, session_K, trial_K, start_K, count_K):
    self.window, self.stride = window, stride
    self.session_K = np.asarray(session_K, np.int32)
    self.trial_K = np.asarray(trial_K, np.int32)
    self.start_K = np.asarray(start_K, np.int64)
    self.end_K = np.cumsum(np.asarray(count_K, np.int64))

  def __len__(self) -> int:
    return int(self.end_K[-1]) if len(self.end_K) else 0

  def __getitem__(self, i) -> tuple[int, int, int]:
    i = operator.index(i)
    i = i + len(self) if i < 0 else i
    if not 0 <= i < len(self):
      raise IndexError(f'window {i} is out of range; there are {len(self)}')
    k = int(np.searchsorted(self.end_K, i, 'right'))
    first = int(self.end_K[k - 1]) if k else 0
    return (int(self.session_K[k]), int(self.trial_K[k]),
            int(self.start_K[k]) + (i - first) * self.stride)

  def __repr__(self) -> str:
    return (f'WindowIndex(windows={len(self)}, trials={len(self.end_K)}, '
            f'window={self.window}, stride={self.stride})')


def windows(store, *, tiers, window: int, stride: int, sessions=None) -> WindowIndex:
  """All windows of `window` samples, `stride` apart from each trial's start, that lie inside
  a trial of the given tiers, in the given sessions (names; None: all) of the store."""
  store = store if isinstance(store, Store) else Store(store)
  if window < 1 or stride < 1:
    raise ValueError(f'window={window}, stride={stride}; expected both >= 1 samples')
  tiers = checked_tiers(tiers)
  names = store.session_names if sessions is None else list(sessions)
  unknown = [s for s in names if s not in store.session_names]
  if unknown:
    raise ValueError(f'sessions {unknown} are not in {store.root}; it has {store.session_names}')
  parts = []
  for name in names:
    session = store.session(name)
    trial_K = session.trials_of(tiers)
    length_K = session.trials['stop'][trial_K] - session.trials['start'][trial_K]
    count_K = np.where(length_K >= window, (length_K - window) // stride + 1, 0)
    keep = count_K > 0
    parts.append((np.full(keep.sum(), session.index), trial_K[keep],
                  session.trials['start'][trial_K[keep]], count_K[keep]))
  columns = [np.concatenate([p[j] for p in parts]) if parts else np.zeros(0) for j in range(4)]
  return WindowIndex(window, stride, *columns)


def tier_counts(store, sessions=None) -> dict[str, int]:
  """Trials per tier (TIERS order, absent tiers left out) in the given sessions (None: all)."""
  store = store if isinstance(store, Store) else Store(store)
  names = store.session_names if sessions is None else list(sessions)
  tiers = np.concatenate([store.session(name).trials['tier'] for name in names] or [[]])
  return {t: int(np.sum(tiers == t)) for t in TIERS if np.any(tiers == t)}


# ---------------------------------------------------------------- pipeline

def example(session: Session, start: int, window: int, *, neurons, max_neurons: int,
            trial: int | None = None) -> dict:
  """One pipeline example (no batch axis) of samples [start, start + window) of a session for
  the given local neurons, padded to max_neurons; trial defaults to the trial holding start
  (-1 if none). Keys and normalisation as in pipeline."""
  neurons_n = np.asarray(neurons, np.int64).reshape(-1)
  w, m, n = window, max_neurons, len(neurons_n)
  if not 1 <= n <= m:
    raise ValueError(f'{n} neurons do not fit max_neurons={m}; expected 1 to {m}')
  data = session.read(start, start + w, neurons_n)
  scaled_Wxn = data['responses'] / session.response_std[neurons_n]
  finite_Wxn = np.isfinite(scaled_Wxn)
  responses_WxM = np.zeros((w, m), np.float32)
  responses_WxM[:, :n] = np.where(finite_Wxn, np.maximum(scaled_Wxn, 0), 0)
  responses_mask_WxM = np.zeros((w, m), bool)
  responses_mask_WxM[:, :n] = finite_Wxn
  neurons_M = np.zeros(m, np.int32)
  neurons_M[:n] = session.neuron_index[neurons_n]
  positions_Mx3 = np.zeros((m, 3), np.float32)
  positions_Mx3[:n] = session.positions_scaled[neurons_n]
  behavior_WxC = (data['behavior'] - session.behavior_mean) / session.behavior_std
  behavior_mask_WxC = np.isfinite(behavior_WxC)
  trial = session.trial_at(start) if trial is None else trial
  return {'responses': responses_WxM, 'responses_mask': responses_mask_WxM,
          'neurons': neurons_M, 'neuron_mask': np.arange(m) < n, 'positions': positions_Mx3,
          'session': np.int32(session.index), 'animal': np.int32(session.animal_index),
          'frames': data['frames'], 'frames_mask': data['frame_valid'],
          'behavior': np.where(behavior_mask_WxC, behavior_WxC, 0).astype(np.float32),
          'behavior_mask': behavior_mask_WxC,
          'times': (np.arange(w) / session.rate).astype(np.float32),
          'trial': np.int32(trial), 'start': np.int32(start)}


class _Examples:
  """Example i of the pipeline: window w of the index, with a neuron subset drawn from
  (seed, i). Holds the store's root only; the store is opened once per process."""

  def __init__(self, root, index: WindowIndex, *, seed: int, max_neurons: int,
               min_neurons: int, train: bool, process_index: int, process_count: int):
    self.root, self.index, self.seed, self.train = str(root), index, seed, train
    self.max_neurons, self.min_neurons = max_neurons, min_neurons
    self.process_index, self.process_count = process_index, process_count
    self._store = None

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_store': None}

  @property
  def store(self) -> Store:
    if self._store is None:
      self._store = Store(self.root)
    return self._store

  def __call__(self, local_index: int, window_id: int) -> dict:
    index = local_index * self.process_count + self.process_index   # same on any process count
    session_index, trial, start = self.index[window_id]
    session = self.store.session(session_index)
    neurons_n = self.neurons(session.num_neurons, np.random.default_rng([self.seed, index]))
    return example(session, start, self.index.window, neurons=neurons_n,
                   max_neurons=self.max_neurons, trial=trial)

  def neurons(self, num_neurons: int, rng: np.random.Generator) -> np.ndarray:
    """Local neuron ids: a random subset of random size when train, else the first ones."""
    hi = min(self.max_neurons, num_neurons)
    if not self.train:
      return np.arange(hi)
    count = int(rng.integers(min(self.min_neurons, num_neurons), hi + 1))
    return np.sort(rng.choice(num_neurons, count, replace=False))


def pipeline(root, *, seed: int, batch_size: int, process_index: int, process_count: int,
             window: int, stride: int, tiers, max_neurons: int, min_neurons: int,
             train: bool = True, workers: int = 0, prefetch: int = 2,
             num_epochs: int | None = None, sessions=None) -> grain.IterDataset:
  """Batches of this process (b = batch_size // process_count) of windows of a neural store.

  Keys and shapes (W = window, M = max_neurons, C channels): responses [b, W, M] float32
  (divided by each neuron's std, NaN -> 0, clipped at 0), responses_mask [b, W, M],
  neurons / neuron_mask [b, M], positions [b, M, 3] (cortical x, y, z in stds of the
  session's spread; 0 when unknown), session, animal, trial, start [b] int32, frames
  [b, W, H, Wd] uint8, frames_mask [b, W], behavior (z-scored) / behavior_mask [b, W, C],
  times [b, W] float32. Process p takes examples p, p + P, ... of the (shuffled, when
  train) repeated window list.
  """
  batches.check_split(batch_size, process_count)
  if not 1 <= min_neurons <= max_neurons:
    raise ValueError(f'min_neurons={min_neurons}, max_neurons={max_neurons}; expected '
                     '1 <= min_neurons <= max_neurons')
  store = Store(root)
  index = windows(store, tiers=tiers, window=window, stride=stride, sessions=sessions)
  if not len(index):
    raise ValueError(f'no window of {window} samples fits inside a {tiers} trial of '
                     f'{sessions or store.session_names} in {store.root}')
  make = _Examples(store.root, index, seed=seed, max_neurons=max_neurons,
                   min_neurons=min_neurons, train=train, process_index=process_index,
                   process_count=process_count)
  return batches.batched(make, len(index), seed=seed, batch_size=batch_size,
                         process_index=process_index, process_count=process_count, train=train,
                         num_epochs=num_epochs, prefetch=prefetch, workers=workers)
