"""Neural recording sessions in a tensorstore zarr3 store, and the Grain window pipeline.

A store (ROOT/catalog.json + one folder of arrays per session) holds responses on a
regular neural clock, stimulus frames and behaviour aligned to it, and trials with tiers.
Example i of a pipeline is a pure function of (seed, i); arrays are read lazily, per window.
"""

import collections
import json
import math
import numbers
import operator
import os
import pathlib
import re
import shutil
import uuid

import grain
import numpy as np
import tensorstore as ts

from brainscale.data import batches

CHANNELS = ('pupil_x', 'pupil_y', 'pupil_size', 'pupil_size_change', 'running_speed')
TIERS = ('train', 'validation', 'test', 'repeats')   # repeats: held-out repeated stimuli
TRIAL_KEYS = ('start', 'stop', 'tier', 'stimulus')
VERSION = 1
CATALOG = 'catalog.json'
STD_FLOOR = 1e-6
MAKE_COMMAND = ('an importer (python -m brainscale.data.importers.sensorium or .nwb) or the '
                'synthetic generator (brainscale.data.synthetic.v1.generate)')
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.+-]*')
_BLOCK_ROWS = 4096   # rows per block when scanning [T, N] arrays at write time


# ---------------------------------------------------------------- alignment

def align_behavior(times_T, behavior_times_S, behavior_SxC) -> np.ndarray:
  """Behaviour [T, C] float32 linearly interpolated at times_T, channel by channel.

  NaN where t lies outside [first, last] behaviour time, or where a bracketing sample with
  non-zero weight is NaN (so a missing sample never leaks beyond its own bracket).
  """
  times_T = np.asarray(times_T, np.float64)
  behavior_times_S = _increasing('behavior_times_S', behavior_times_S, minimum=2)
  behavior_SxC = np.asarray(behavior_SxC, np.float64)
  if behavior_SxC.ndim != 2 or len(behavior_SxC) != len(behavior_times_S):
    raise ValueError(f'behavior_SxC has shape {behavior_SxC.shape}; expected '
                     f'[{len(behavior_times_S)}, C] to match behavior_times_S')
  lo_T = np.clip(np.searchsorted(behavior_times_S, times_T, 'right') - 1, 0,
                 len(behavior_times_S) - 2)
  t0_T, t1_T = behavior_times_S[lo_T], behavior_times_S[lo_T + 1]
  frac_Tx1 = np.clip((times_T - t0_T) / (t1_T - t0_T), 0, 1)[:, None]
  b0_TxC, b1_TxC = behavior_SxC[lo_T], behavior_SxC[lo_T + 1]
  out_TxC = np.nan_to_num(b0_TxC) * (1 - frac_Tx1) + np.nan_to_num(b1_TxC) * frac_Tx1
  missing_TxC = (np.isnan(b0_TxC) & (frac_Tx1 < 1)) | (np.isnan(b1_TxC) & (frac_Tx1 > 0))
  outside_T = (times_T < behavior_times_S[0]) | (times_T > behavior_times_S[-1])
  out_TxC[missing_TxC | outside_T[:, None]] = np.nan
  return out_TxC.astype(np.float32)


def nearest_frame(times_T, frame_times_F) -> np.ndarray:
  """Index [T] int32 of the frame nearest each time (the earlier on ties); -1 where that frame
  is more than one median frame period away, and everywhere when there are no frames."""
  times_T = np.asarray(times_T, np.float64)
  frame_times_F = _increasing('frame_times_F', frame_times_F, minimum=0)
  if len(frame_times_F) == 0:
    return np.full(times_T.shape, -1, np.int32)
  if len(frame_times_F) == 1:
    raise ValueError('frame_times_F holds 1 frame time; the frame period needs at least 2')
  after_T = np.clip(np.searchsorted(frame_times_F, times_T), 1, len(frame_times_F) - 1)
  before_T = after_T - 1
  earlier_T = times_T - frame_times_F[before_T] <= frame_times_F[after_T] - times_T
  nearest_T = np.where(earlier_T, before_T, after_T)
  far_T = np.abs(times_T - frame_times_F[nearest_T]) > np.median(np.diff(frame_times_F))
  return np.where(far_T, -1, nearest_T).astype(np.int32)


def _increasing(name: str, values, *, minimum: int) -> np.ndarray:
  """values as float64 [S], checked finite and strictly increasing with S >= minimum."""
  values_S = np.asarray(values, np.float64)
  if values_S.ndim != 1 or len(values_S) < minimum:
    raise ValueError(f'{name} has shape {values_S.shape}; expected [S] with S >= {minimum}')
  if not np.isfinite(values_S).all():
    raise ValueError(f'{name} holds {np.sum(~np.isfinite(values_S))} non-finite times; '
                     'expected finite seconds')
  if len(values_S) > 1 and not (np.diff(values_S) > 0).all():
    k = int(np.argmin(np.diff(values_S) > 0))
    raise ValueError(f'{name} is not strictly increasing: {values_S[k]} then '
                     f'{values_S[k + 1]} at index {k}')
  return values_S


# ---------------------------------------------------------------- writing

def write_session(root, name, *, animal: str, rate: float, responses_TxN, frames_FxHxW,
                  frame_times_F, behavior_SxC, behavior_times_S, unit_ids, trials: dict,
                  positions_Nx3=None, areas=None, start_time=0.0, overwrite=False) -> None:
  """Validates one session, aligns behaviour and frames to its neural clock and writes it.

  The neural clock is start_time + arange(T) / rate. Trials are sample ranges [start, stop)
  with a tier of TIERS. Unseen (animal, unit id) pairs join the catalog's global neuron
  table. Arrays are written to a hidden folder and renamed, then the catalog is replaced:
  an exception at any point leaves the store as it was.
  """
  root = pathlib.Path(root)
  catalog = _read_catalog(root) if (root / CATALOG).is_file() else None
  responses_TxN = _responses(responses_TxN)
  num_samples, num_neurons = responses_TxN.shape
  frames_FxHxW = _frames(frames_FxHxW)
  frame_times_F = _increasing('frame_times_F', frame_times_F, minimum=0)
  _check_session(root, name, catalog, animal=animal, rate=rate, start_time=start_time,
                 frame_shape=frames_FxHxW.shape[1:], overwrite=overwrite)
  if len(frame_times_F) != len(frames_FxHxW):
    raise ValueError(f'frame_times_F has {len(frame_times_F)} times for '
                     f'{len(frames_FxHxW)} frames; expected one per frame')
  unit_ids = _unit_ids(unit_ids, num_neurons)
  positions_Nx3 = _positions(positions_Nx3, num_neurons)
  areas = _areas(areas, num_neurons)
  trials = _trials(trials, num_samples)
  timestamps_T = start_time + np.arange(num_samples) / rate
  behavior_TxC = _aligned_behavior(timestamps_T, behavior_times_S, behavior_SxC)
  frame_index_T = nearest_frame(timestamps_T, frame_times_F)
  catalog = _new_catalog(rate, frames_FxHxW.shape[1:]) if catalog is None else catalog
  catalog, neuron_index_N = _catalog_with(catalog, name, animal, unit_ids, num_samples,
                                          len(trials['start']))
  meta = {'animal': animal, 'rate': float(rate), 'start_time': float(start_time),
          'unit_ids': unit_ids, 'neuron_index': neuron_index_N.tolist(),
          'positions': [[None if math.isnan(v) else v for v in p] for p in positions_Nx3.tolist()],
          'areas': areas, 'trials': {k: v.tolist() for k, v in trials.items()},
          **_stats(responses_TxN, behavior_TxC, _stats_rows(trials, num_samples))}
  arrays = {'responses': (responses_TxN, [256, min(num_neurons, 512)]),
            'timestamps': (timestamps_T, [4096]),
            'frames': (frames_FxHxW, [16, *frames_FxHxW.shape[1:]]),
            'frame_index': (frame_index_T, [4096]),
            'behavior': (behavior_TxC, [256, len(CHANNELS)])}
  _commit(root, name, arrays, meta, catalog)


def _responses(responses_TxN) -> np.ndarray:
  responses_TxN = np.asarray(responses_TxN)
  if responses_TxN.ndim != 2 or 0 in responses_TxN.shape:
    raise ValueError(f'responses_TxN has shape {responses_TxN.shape}; expected [T, N] with '
                     'T, N >= 1')
  if responses_TxN.dtype.kind not in 'fiu':
    raise ValueError(f'responses_TxN has dtype {responses_TxN.dtype}; expected numbers')
  responses_TxN = responses_TxN.astype(np.float32, copy=False)
  infinite = sum(int(np.isinf(block).sum()) for block in _blocks(responses_TxN))
  if infinite:
    raise ValueError(f'responses_TxN holds {infinite} infinite values; expected finite '
                     'values, NaN for missing samples')
  return responses_TxN


def _frames(frames_FxHxW) -> np.ndarray:
  frames_FxHxW = np.asarray(frames_FxHxW)
  if frames_FxHxW.dtype != np.uint8 or frames_FxHxW.ndim != 3 or 0 in frames_FxHxW.shape[1:]:
    raise ValueError(f'frames_FxHxW is {frames_FxHxW.dtype} {frames_FxHxW.shape}; expected '
                     'uint8 [F, H, W] (grayscale 2D frames)')
  return frames_FxHxW


def _check_session(root, name, catalog, *, animal, rate, start_time, frame_shape, overwrite):
  """Raises unless name, animal, rate and frame shape fit this store."""
  if not isinstance(animal, str) or not animal:
    raise ValueError(f'animal {animal!r} must be a non-empty string')
  if not math.isfinite(start_time):
    raise ValueError(f'start_time={start_time!r}; expected finite seconds')
  _check_fit(root, name, catalog, rate=rate, frame_shape=frame_shape, overwrite=overwrite)


def _check_fit(root, name, catalog, *, rate, frame_shape, overwrite):
  if not isinstance(name, str) or not _NAME.fullmatch(name) or name == CATALOG:
    raise ValueError(f'session name {name!r} is not a plain folder name; expected letters, '
                     'digits and _.+- not starting with a dot')
  if not (isinstance(rate, numbers.Real) and math.isfinite(rate) and rate > 0):
    raise ValueError(f'rate={rate!r}; expected a positive number of samples per second')
  exists = (root / name).exists() or catalog is not None and name in [
      s['name'] for s in catalog['sessions']]
  if exists and not overwrite:
    raise ValueError(f'session {name!r} already exists in {root}; pass overwrite=True '
                     '(--overwrite) to replace it, or another name')
  if catalog is None:
    return
  if not math.isclose(rate, catalog['rate'], rel_tol=1e-9):
    raise ValueError(f'rate={rate} Hz differs from the store\'s {catalog["rate"]} Hz '
                     f'({root}); every session of a store shares one rate (--rate)')
  if list(frame_shape) != catalog['frame_shape']:
    h, w = catalog['frame_shape']
    raise ValueError(f'frames are {tuple(frame_shape)}; the store {root} holds frames '
                     f'{(h, w)}: expected frame_shape={(h, w)} (--frame_shape {h},{w})')


def check_fits(root, name: str, *, rate: float, frame_shape, overwrite: bool = False) -> None:
  """Raises where write_session would refuse session `name` of this rate and frame shape;
  importers call it before their long read."""
  root = pathlib.Path(root)
  catalog = _read_catalog(root) if (root / CATALOG).is_file() else None
  _check_fit(root, name, catalog, rate=rate, frame_shape=frame_shape, overwrite=overwrite)


def _unit_ids(unit_ids, num_neurons: int) -> list[str]:
  unit_ids = [str(u) for u in unit_ids]
  if len(unit_ids) != num_neurons:
    raise ValueError(f'unit_ids has {len(unit_ids)} ids for {num_neurons} neurons; '
                     'expected one per response column')
  if len(set(unit_ids)) != num_neurons:
    twice = next(u for u, count in collections.Counter(unit_ids).items() if count > 1)
    raise ValueError(f'unit id {twice!r} appears twice in unit_ids; expected unique ids')
  return unit_ids


def _positions(positions_Nx3, num_neurons: int) -> np.ndarray:
  if positions_Nx3 is None:
    return np.full((num_neurons, 3), np.nan)
  positions_Nx3 = np.asarray(positions_Nx3, np.float64)
  if positions_Nx3.shape != (num_neurons, 3):
    raise ValueError(f'positions_Nx3 has shape {positions_Nx3.shape}; expected '
                     f'({num_neurons}, 3) micrometres')
  return positions_Nx3


def _areas(areas, num_neurons: int) -> list[str]:
  areas = [''] * num_neurons if areas is None else [str(a) for a in areas]
  if len(areas) != num_neurons:
    raise ValueError(f'areas has {len(areas)} entries for {num_neurons} neurons; '
                     'expected one per neuron')
  return areas


def _trials(trials: dict, num_samples: int) -> dict:
  """Trials as arrays: start, stop, stimulus int64 [K], tier str [K]; checked against T."""
  if not isinstance(trials, dict) or set(trials) != set(TRIAL_KEYS):
    keys = sorted(trials) if isinstance(trials, dict) else type(trials).__name__
    raise ValueError(f'trials has keys {keys}; expected exactly {list(TRIAL_KEYS)}')
  sizes = {k: len(trials[k]) for k in TRIAL_KEYS}
  if len(set(sizes.values())) != 1 or not sizes['start']:
    raise ValueError(f'trials has lengths {sizes}; expected one equal length K >= 1')
  out = {k: _integers(f'trials[{k!r}]', trials[k]) for k in ('start', 'stop', 'stimulus')}
  out['tier'] = np.array([str(t) for t in trials['tier']])
  bad = [str(t) for t in out['tier'] if t not in TIERS]
  if bad:
    raise ValueError(f'trial tier {bad[0]!r} is not one of {TIERS}')
  wrong = (out['start'] < 0) | (out['stop'] > num_samples) | (out['start'] >= out['stop'])
  if wrong.any():
    k = int(np.argmax(wrong))
    raise ValueError(f'trial {k} is [{out["start"][k]}, {out["stop"][k]}); expected '
                     f'0 <= start < stop <= T = {num_samples}')
  return out


def _integers(name: str, values) -> np.ndarray:
  values_K = np.asarray(values)
  if values_K.dtype.kind not in 'iuf' or (values_K != np.round(values_K)).any():
    raise ValueError(f'{name} holds {values_K[:4].tolist()}...; expected integers')
  return values_K.astype(np.int64)


def _aligned_behavior(timestamps_T, behavior_times_S, behavior_SxC) -> np.ndarray:
  behavior_SxC = np.asarray(behavior_SxC)
  if behavior_SxC.ndim != 2 or behavior_SxC.shape[1] != len(CHANNELS):
    raise ValueError(f'behavior_SxC has shape {behavior_SxC.shape}; expected [S, '
                     f'{len(CHANNELS)}] with channels {CHANNELS}')
  if np.isinf(behavior_SxC).any():
    raise ValueError(f'behavior_SxC holds {int(np.isinf(behavior_SxC).sum())} infinite '
                     'values; expected NaN for missing samples')
  return align_behavior(timestamps_T, behavior_times_S, behavior_SxC)


def _stats_rows(trials: dict, num_samples: int) -> np.ndarray:
  """bool [T]: samples of train-tier trials, or every sample if there are none."""
  rows_T = np.zeros(num_samples, bool)
  for start, stop, tier in zip(trials['start'], trials['stop'], trials['tier']):
    rows_T[start:stop] |= tier == 'train'
  return rows_T if rows_T.any() else np.ones(num_samples, bool)


def _stats(responses_TxN, behavior_TxC, rows_T) -> dict:
  """Per-neuron response and per-channel behaviour mean and std over the rows_T samples."""
  response_mean_N, response_std_N = _finite_moments(responses_TxN, rows_T)
  behavior_mean_C, behavior_std_C = _finite_moments(behavior_TxC, rows_T)
  return {'response_mean': response_mean_N.tolist(), 'response_std': response_std_N.tolist(),
          'behavior_mean': behavior_mean_C.tolist(), 'behavior_std': behavior_std_C.tolist()}


def _blocks(x_TxK: np.ndarray, rows_T: np.ndarray | None = None):
  """x in blocks of rows (only the rows_T rows if given), so no [T, K] temporary is made."""
  for r in range(0, len(x_TxK), _BLOCK_ROWS):
    block = x_TxK[r:r + _BLOCK_ROWS]
    yield block if rows_T is None else block[rows_T[r:r + _BLOCK_ROWS]]


def _finite_moments(x_TxK: np.ndarray, rows_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and std [K] over the finite values of the chosen rows, std floored at STD_FLOOR;
  (0, 1) for a column with no finite value."""
  count_K = np.zeros(x_TxK.shape[1])
  total_K = np.zeros(x_TxK.shape[1])
  for block in _blocks(x_TxK, rows_T):
    count_K += np.isfinite(block).sum(0)
    total_K += np.nansum(block, 0, dtype=np.float64)
  mean_K = total_K / np.maximum(count_K, 1)
  squares_K = np.zeros(x_TxK.shape[1])
  for block in _blocks(x_TxK, rows_T):
    squares_K += np.nansum(np.square(block - mean_K), 0)
  std_K = np.maximum(np.sqrt(squares_K / np.maximum(count_K, 1)), STD_FLOOR)
  return mean_K, np.where(count_K > 0, std_K, 1.0)


# ---------------------------------------------------------------- catalog

def _new_catalog(rate: float, frame_shape) -> dict:
  return {'version': VERSION, 'rate': float(rate), 'frame_shape': list(frame_shape),
          'channels': list(CHANNELS), 'animals': [], 'sessions': [], 'neurons': []}


def _read_catalog(root: pathlib.Path) -> dict:
  catalog = json.loads((root / CATALOG).read_text())
  if catalog.get('version') != VERSION:
    raise ValueError(f'{root / CATALOG} has version {catalog.get("version")}; this code reads '
                     f'version {VERSION}')
  return catalog


def _catalog_with(catalog: dict, name: str, animal: str, unit_ids: list[str], samples: int,
                  trials: int) -> tuple[dict, np.ndarray]:
  """A new catalog with this session (replacing one of that name) and its global neurons."""
  catalog = json.loads(json.dumps(catalog))
  index = {(a, u): i for i, (a, u) in enumerate(catalog['neurons'])}
  for unit in unit_ids:
    if (animal, unit) not in index:
      index[(animal, unit)] = len(catalog['neurons'])
      catalog['neurons'].append([animal, unit])
  if animal not in catalog['animals']:
    catalog['animals'].append(animal)
  entry = {'name': name, 'animal': animal, 'samples': samples, 'neurons': len(unit_ids),
           'trials': trials}
  names = [s['name'] for s in catalog['sessions']]
  if name in names:
    catalog['sessions'][names.index(name)] = entry
  else:
    catalog['sessions'].append(entry)
  return catalog, np.array([index[(animal, u)] for u in unit_ids], np.int32)


def _write_catalog(root: pathlib.Path, catalog: dict) -> None:
  """Replaces ROOT/catalog.json atomically."""
  tmp = root / f'.{CATALOG}.tmp-{uuid.uuid4().hex}'
  try:
    tmp.write_text(json.dumps(catalog, indent=1))
    os.replace(tmp, root / CATALOG)
  finally:
    tmp.unlink(missing_ok=True)


def _write_array(path: pathlib.Path, array: np.ndarray, chunks: list[int]) -> None:
  dtype = {np.dtype(np.float32): 'float32', np.dtype(np.float64): 'float64',
           np.dtype(np.uint8): 'uint8', np.dtype(np.int32): 'int32'}[array.dtype]
  codecs = [{'name': 'bytes', 'configuration': {'endian': 'little'}},
            {'name': 'zstd', 'configuration': {'level': 3}}]
  metadata = {'shape': list(array.shape), 'data_type': dtype, 'codecs': codecs,
              'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': chunks}}}
  spec = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': str(path)},
          'metadata': metadata}
  ts.open(spec, create=True).result().write(array).result()


def _commit(root: pathlib.Path, name: str, arrays: dict, meta: dict, catalog: dict) -> None:
  """Writes the session to a hidden folder, renames it into place, then replaces the catalog;
  on any exception the store is left as it was."""
  root.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex
  tmp, old, final = root / f'.{name}.tmp-{tag}', root / f'.{name}.old-{tag}', root / name
  placed = False
  try:
    tmp.mkdir()
    for array_name, (array, chunks) in arrays.items():
      _write_array(tmp / array_name, array, chunks)
    (tmp / 'meta.json').write_text(json.dumps(meta))
    if final.exists():
      os.rename(final, old)
    os.rename(tmp, final)
    placed = True
    _write_catalog(root, catalog)
  except BaseException:
    if placed:
      shutil.rmtree(final, ignore_errors=True)
    if old.exists():
      os.rename(old, final)
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- reading

class Store:
  """A neural store at root: the catalog, and its sessions opened on demand (cached)."""

  def __init__(self, root):
    self.root = pathlib.Path(root)
    if not (self.root / CATALOG).is_file():
      raise FileNotFoundError(f'{self.root / CATALOG} not found: {self.root} is not a neural '
                              f'store; make one with {MAKE_COMMAND}')
    self.catalog = _read_catalog(self.root)
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
    return np.flatnonzero(np.isin(self.trials['tier'], _tiers(tiers)))

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


def _tiers(tiers) -> list[str]:
  tiers = [tiers] if isinstance(tiers, str) else [str(t) for t in tiers]
  bad = [t for t in tiers if t not in TIERS]
  if bad or not tiers:
    raise ValueError(f'tiers {tiers} must be a non-empty selection of {TIERS}')
  return tiers


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
  tiers = _tiers(tiers)
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
