"""A neural store: recording sessions in a tensorstore zarr3 store, read lazily.

A store (ROOT/catalog.json + one folder of arrays per session) holds responses on a
regular neural clock, stimulus frames and behaviour (data/behavior.py:CHANNELS) aligned to
it, and trials with tiers.
write.py writes it (importers, synthetic data); windows.py samples training windows of it.
"""

import json
import operator
import pathlib

import numpy as np
import tensorstore as ts

TIERS = ('train', 'validation', 'test', 'repeats')   # repeats: held-out repeated stimuli
TRIAL_KEYS = ('start', 'stop', 'tier', 'stimulus')
VERSION = 1
CATALOG = 'catalog.json'
STD_FLOOR = 1e-6
MAKE_COMMAND = ('an importer (python -m brainscale.data.importers.sensorium or .nwb) or the '
                'synthetic generator (brainscale.data.synthetic.v1_files.generate)')

def read_catalog(root: pathlib.Path) -> dict:
  catalog = json.loads((root / CATALOG).read_text())
  if catalog.get('version') != VERSION:
    raise ValueError(f'{root / CATALOG} has version {catalog.get("version")}; this code reads '
                     f'version {VERSION}')
  return catalog


# ---------------------------------------------------------------- reading

class Store:
  """A neural store at root: the catalog, and its sessions opened on demand (cached)."""

  def __init__(self, root):
    self.root = pathlib.Path(root)
    if not (self.root / CATALOG).is_file():
      raise FileNotFoundError(f'{self.root / CATALOG} not found: {self.root} is not a neural '
                              f'store; make one with {MAKE_COMMAND}')
    self.catalog = read_catalog(self.root)
    self.rate = float(self.catalog['rate'])
    self.frame_shape = tuple(self.catalog['frame_shape'])
    self.channels = tuple(self.catalog['channels'])
    self.animals = list(self.catalog['animals'])
    self.session_names = [s['name'] for s in self.catalog['sessions']]
    self.num_neurons = len(self.catalog['neurons'])
    self._sessions = {}

  def session_index(self, name_or_index) -> int:
    """The catalog index of a session given by name or index."""
    if isinstance(name_or_index, str):
      if name_or_index not in self.session_names:
        raise ValueError(f'session {name_or_index!r} is not in {self.root}; it has '
                         f'{self.session_names}')
      return self.session_names.index(name_or_index)
    index = operator.index(name_or_index)
    if not 0 <= index < len(self.session_names):
      raise ValueError(f'session index {index} is out of range; {self.root} has '
                       f'{len(self.session_names)} sessions')
    return index

  def session(self, name_or_index) -> 'Session':
    index = self.session_index(name_or_index)
    if index not in self._sessions:
      self._sessions[index] = Session(self, index)
    return self._sessions[index]

  def __repr__(self) -> str:
    return (f'Store({str(self.root)!r}, sessions={len(self.session_names)}, '
            f'neurons={self.num_neurons})')


class Session:
  """One recording session: metadata in memory, arrays opened lazily and read by slice."""

  def __init__(self, store: Store, index: int):
    self.index = index
    self.name = store.session_names[index]
    self.path = store.root / self.name
    meta = json.loads((self.path / 'meta.json').read_text())
    self.animal = meta['animal']
    self.animal_index = store.animals.index(self.animal)
    self.rate = float(meta['rate'])
    self.start_time = float(meta['start_time'])
    self.num_samples = int(store.catalog['sessions'][index]['samples'])
    self.unit_ids = list(meta['unit_ids'])
    self.num_neurons = len(self.unit_ids)
    self.neuron_index = np.array(meta['neuron_index'], np.int32)
    self.positions = np.array(meta['positions'], np.float64).reshape(self.num_neurons, 3)
    self.positions_scaled = _standardised(self.positions)
    self.areas = list(meta['areas'])
    self.trials = {k: np.array(meta['trials'][k], np.int64) for k in ('start', 'stop', 'stimulus')}
    self.trials['tier'] = np.array(meta['trials']['tier'], str)
    for key in ('response_mean', 'response_std', 'behavior_mean', 'behavior_std'):
      setattr(self, key, np.array(meta[key], np.float32))
    self._arrays = {}

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_arrays': {}}   # tensorstore handles are reopened after pickling

  def array(self, name: str) -> ts.TensorStore:
    """The session's zarr3 array `name`, opened on first use in this process."""
    if name not in self._arrays:
      spec = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': str(self.path / name)}}
      self._arrays[name] = ts.open(spec, open=True, read=True).result()
    return self._arrays[name]

  def read(self, start: int, stop: int, neurons=None) -> dict:
    """Samples [start, stop) of the session (neurons: local indices, default all).

    {'responses' [W, n] float32, 'frames' [W, H, Wd] uint8 (zeros where no frame),
    'frame_valid' [W] bool, 'behavior' [W, C] float32, 'timestamps' [W] float64}; NaN kept.
    """
    start, stop = operator.index(start), operator.index(stop)
    if not 0 <= start <= stop <= self.num_samples:
      raise ValueError(f'samples [{start}, {stop}) are not inside session {self.name!r} '
                       f'of {self.num_samples} samples')
    reads = {k: self.array(k)[start:stop].read()
             for k in ('responses', 'behavior', 'timestamps', 'frame_index')}
    data = {k: future.result() for k, future in reads.items()}
    frame_index_W = data.pop('frame_index')
    if neurons is not None:
      data['responses'] = data['responses'][:, np.asarray(neurons)]
    data['frames'], data['frame_valid'] = self._frames(frame_index_W)
    return data

  def _frames(self, frame_index_W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frame of each sample (one read of the frame range they span), and which exist."""
    frames = self.array('frames')
    valid_W = frame_index_W >= 0
    frames_WxHxWd = np.zeros((len(frame_index_W), *frames.shape[1:]), np.uint8)
    if valid_W.any():
      lo, hi = int(frame_index_W[valid_W].min()), int(frame_index_W[valid_W].max())
      block_FxHxWd = frames[lo:hi + 1].read().result()
      frames_WxHxWd[valid_W] = block_FxHxWd[frame_index_W[valid_W] - lo]
    return frames_WxHxWd, valid_W

  def trial_at(self, sample: int) -> int:
    """The first trial whose [start, stop) holds this sample, -1 if none does."""
    inside_K = (self.trials['start'] <= sample) & (sample < self.trials['stop'])
    return int(np.argmax(inside_K)) if inside_K.any() else -1

  def trials_of(self, tiers) -> np.ndarray:
    """Ids of the trials whose tier is in tiers (a tier name or a sequence of them)."""
    return np.flatnonzero(np.isin(self.trials['tier'], checked_tiers(tiers)))

  def __repr__(self) -> str:
    return (f'Session({self.name!r}, animal={self.animal!r}, samples={self.num_samples}, '
            f'neurons={self.num_neurons}, trials={len(self.trials["start"])})')


def _standardised(positions_Nx3: np.ndarray) -> np.ndarray:
  """Positions in stds of the session's own spread per axis (mean 0); missing -> 0."""
  finite_Nx3 = np.isfinite(positions_Nx3)
  count_3 = np.maximum(finite_Nx3.sum(0), 1)
  x_Nx3 = np.where(finite_Nx3, positions_Nx3, 0)
  mean_3 = x_Nx3.sum(0) / count_3
  std_3 = np.sqrt((np.where(finite_Nx3, x_Nx3 - mean_3, 0) ** 2).sum(0) / count_3)
  scaled_Nx3 = (x_Nx3 - mean_3) / np.maximum(std_3, 1e-6)
  return np.where(finite_Nx3 & (std_3 > 1e-6), scaled_Nx3, 0).astype(np.float32)


def checked_tiers(tiers) -> list[str]:
  tiers = [tiers] if isinstance(tiers, str) else [str(t) for t in tiers]
  bad = [t for t in tiers if t not in TIERS]
  if bad or not tiers:
    raise ValueError(f'tiers {tiers} must be a non-empty selection of {TIERS}')
  return tiers
