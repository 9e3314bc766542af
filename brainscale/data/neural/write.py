"""Writing a neural store: a session validated, aligned to its neural clock, committed atomically.

Behaviour is interpolated and frames matched to the neural sample times here, once;
the store's format (catalog.json, one folder of zarr3 arrays per session) is store.py's.
"""

import collections
import json
import math
import numbers
import os
import pathlib
import re
import shutil
import uuid

import numpy as np
import tensorstore as ts

from brainscale.data.behavior import CHANNELS
from brainscale.data.neural.store import (
  CATALOG,
  STD_FLOOR,
  TIERS,
  TRIAL_KEYS,
  VERSION,
  read_catalog,
)

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
  catalog = read_catalog(root) if (root / CATALOG).is_file() else None
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
  catalog = read_catalog(root) if (root / CATALOG).is_file() else None
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
