"""An NWB file → a neural store session: calcium traces or spikes, pupil and running, stimulus.

  python -m brainscale.data.importers.nwb FILE ROOT [--session NAME] [--movie PATH] [--rate 30]

Calcium traces (processing['ophys']: DfOverF, else Fluorescence, else a RoiResponseSeries) are
linearly resampled to `rate`; without them the units table's spike times are binned at `rate`.
Behaviour is aligned to that clock per channel; stimulus frames keep theirs (the store aligns).
"""

import argparse
import dataclasses
import math
import pathlib
import sys

import av
import numpy as np
import pynwb
import tqdm
from pynwb.base import TimeSeries
from pynwb.image import ImageSeries
from pynwb.ophys import DfOverF, Fluorescence, RoiResponseSeries

from brainscale.data import neural

CHUNK = 4096   # neural samples resampled per read
FRAME_VALUES = 1 << 24   # stimulus pixel values converted per block (64 MB as float32)
POSITION_COLUMNS = ('position', 'positions', 'centroid', 'center', 'xyz')
AREA_COLUMNS = ('area', 'brain_area', 'location')
EYE = ('pupil', 'eye')
# behaviour series, found by the words of their 'container/name' path: one word of each group
# and none of the excluded words
LOOKUPS = {'pupil_x/pupil_y': ((EYE, ('position', 'center', 'centre')), ()),
           'pupil_size': ((EYE, ('size', 'area', 'diameter')), ()),
           'running_speed': ((('running', 'speed', 'velocity'),), EYE)}
BEHAVIOR_PLACES = "processing['behavior'] and acquisition"
LUMA = np.array([0.299, 0.587, 0.114], np.float32)   # ITU-R BT.601


@dataclasses.dataclass
class _Neural:
  responses_TxN: np.ndarray
  start_time: float   # seconds of sample 0 on the NWB clock
  unit_ids: list[str]
  positions_Nx3: np.ndarray
  areas: list[str] | None


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _times(series: TimeSeries) -> np.ndarray:
  """Seconds of each sample: the timestamps, or starting_time + i / rate."""
  return np.asarray(series.get_timestamps(), np.float64)


def _values(series: TimeSeries, rows=slice(None)) -> np.ndarray:
  """data[rows] in the series' unit (conversion and offset applied), float32 2D."""
  data_SxC = np.asarray(series.data[rows], np.float32) * series.conversion + series.offset
  return data_SxC.reshape(len(data_SxC), -1).astype(np.float32)


# ---------------------------------------------------------------- neural activity

def _calcium_series(nwbfile) -> RoiResponseSeries | None:
  """processing['ophys']: a DfOverF's series, else a Fluorescence's, else a bare one."""
  if 'ophys' not in nwbfile.processing:
    return None
  interfaces = list(nwbfile.processing['ophys'].data_interfaces.values())
  for kind in (DfOverF, Fluorescence):
    for container in interfaces:
      if isinstance(container, kind) and container.roi_response_series:
        return next(iter(container.roi_response_series.values()))
  return next((c for c in interfaces if isinstance(c, RoiResponseSeries)), None)


def _positions_Nx3(table, rows: np.ndarray) -> np.ndarray:
  """From a position-like [N, 2|3] column, else x/y/z columns (absent ones 0), else zeros."""
  for name in POSITION_COLUMNS:
    if name in table.colnames:
      xyz = np.asarray(table[name].data[:], np.float32)[rows]
      if xyz.ndim == 2 and xyz.shape[1] in (2, 3):
        return np.pad(xyz, ((0, 0), (0, 3 - xyz.shape[1])))
  return np.stack([np.asarray(table[a].data[:], np.float32)[rows] if a in table.colnames
                   else np.zeros(len(rows), np.float32) for a in 'xyz'], axis=1)


def _areas(table, rows: np.ndarray, default: str | None) -> list[str] | None:
  for name in AREA_COLUMNS:
    if name in table.colnames:
      return [_text(v) for v in np.asarray(table[name].data[:])[rows]]
  return None if default is None else [default] * len(rows)


def _grid_interpolation(times_S: np.ndarray, rate: float, where: str):
  """(grid times [T], left sample [T], weight of the right sample [T]) of a regular grid."""
  if len(times_S) < 2 or not np.all(np.diff(times_S) > 0):
    raise ValueError(f'{where} has {len(times_S)} timestamps; expected at least 2, increasing')
  count = int(np.floor((times_S[-1] - times_S[0]) * rate + 1e-6)) + 1
  grid_T = times_S[0] + np.arange(count) / rate
  right_T = np.clip(np.searchsorted(times_S, grid_T, 'right'), 1, len(times_S) - 1)
  weight_T = (grid_T - times_S[right_T - 1]) / (times_S[right_T] - times_S[right_T - 1])
  return grid_T, right_T - 1, np.clip(weight_T, 0, 1)


def _resampled(series: RoiResponseSeries, rate: float, where: str, progress) -> np.ndarray:
  """[T, N] float32 linear interpolation at `rate` from the first timestamp; NaN stays NaN."""
  times_S = _times(series)
  if series.data.shape[0] != len(times_S):
    raise ValueError(f'{where} has {series.data.shape[0]} samples and {len(times_S)} '
                     'timestamps; expected one per sample')
  grid_T, left_T, weight_T = _grid_interpolation(times_S, rate, where)
  out_TxN = np.empty((len(grid_T), _values(series, slice(0, 1)).shape[1]), np.float32)
  with tqdm.tqdm(total=len(grid_T), desc='resample calcium', unit='sample',
                 disable=not progress) as bar:
    for a in range(0, len(grid_T), CHUNK):
      b = min(a + CHUNK, len(grid_T))
      first = left_T[a]
      block_SxN = _values(series, slice(first, left_T[b - 1] + 2))
      left_WxN, right_WxN = block_SxN[left_T[a:b] - first], block_SxN[left_T[a:b] - first + 1]
      w_Wx1 = weight_T[a:b, None].astype(np.float32)
      out_TxN[a:b] = np.where(w_Wx1 == 0, left_WxN, left_WxN + w_Wx1 * (right_WxN - left_WxN))
      bar.update(b - a)
  return out_TxN


def _calcium(series: RoiResponseSeries, path, rate: float, progress) -> _Neural:
  where = f"calcium series {series.name!r} in {path}"
  responses_TxN = _resampled(series, rate, where, progress)
  rows = np.asarray(series.rois.data[:], np.int64)
  if len(rows) != responses_TxN.shape[1]:
    raise ValueError(f'{where} has {responses_TxN.shape[1]} traces and {len(rows)} rois; '
                     'expected one roi per trace')
  table = series.rois.table
  plane = getattr(table, 'imaging_plane', None)
  return _Neural(responses_TxN, float(_times(series)[0]),
                 [_text(u) for u in np.asarray(table.id.data[:])[rows]],
                 _positions_Nx3(table, rows), _areas(table, rows, plane and plane.location))


def _spikes(units, path, span: tuple[float, float], rate: float, progress) -> _Neural:
  """Spike counts in bins of 1 / rate over the spikes and trials; timestamps at bin centres."""
  if 'spike_times' not in units.colnames:
    raise ValueError(f'units table of {path} has no spike_times column; expected one')
  ends = np.asarray(units.spike_times_index.data[:], np.int64)
  times = np.asarray(units.spike_times.data[:], np.float64)
  if not len(times) and span[0] > span[1]:
    raise ValueError(f'units table of {path} holds no spikes and {path} no trials; '
                     'expected spikes to bin')
  first = min(span[0], times.min(initial=np.inf))
  count = int(np.floor((max(span[1], times.max(initial=-np.inf)) - first) * rate)) + 1
  counts_TxN = np.empty((count, len(ends)), np.float32)
  for n in tqdm.trange(len(ends), desc='bin spikes', unit='unit', disable=not progress):
    spikes = times[(ends[n - 1] if n else 0):ends[n]]
    counts_TxN[:, n] = np.bincount(np.floor((spikes - first) * rate).astype(np.int64),
                                   minlength=count)
  rows = np.arange(len(ends))
  return _Neural(counts_TxN, first + 0.5 / rate, [_text(u) for u in units.id.data[:]],
                 _positions_Nx3(units, rows), _areas(units, rows, None))


def _trial_span(nwbfile) -> tuple[float, float]:
  """(first start, last stop) of the trials table; (inf, -inf) without one."""
  if nwbfile.trials is None or not len(nwbfile.trials):
    return np.inf, -np.inf
  return (float(np.min(nwbfile.trials['start_time'].data[:])),
          float(np.max(nwbfile.trials['stop_time'].data[:])))


def _neural_source(nwbfile, path):
  series = _calcium_series(nwbfile)
  if series is None and (nwbfile.units is None or not len(nwbfile.units)):
    raise ValueError('no calcium traces (processing/ophys DfOverF/Fluorescence/RoiResponseSeries) '
                     f'and no units table in {path}')
  return series if series is not None else nwbfile.units


# ---------------------------------------------------------------- behaviour

def _behavior_candidates(nwbfile) -> list[tuple[str, TimeSeries]]:
  """('container/name', series) of every non-image TimeSeries in behaviour and acquisition."""
  places = [nwbfile.processing[m].data_interfaces for m in ('behavior', 'behaviour')
            if m in nwbfile.processing] + [nwbfile.acquisition]
  found = []
  for interfaces in places:
    for name, obj in interfaces.items():
      children = [(name, obj)] if isinstance(obj, TimeSeries) else [
          (f'{name}/{c.name}', c) for c in obj.children if isinstance(c, TimeSeries)]
      found += [(n, s) for n, s in children if not isinstance(s, ImageSeries)]
  return found


def _matches(name: str, groups, exclude) -> bool:
  name = name.lower()
  return all(any(w in name for w in group) for group in groups) and not any(
      w in name for w in exclude)


def _behavior_sources(nwbfile, path, missing: str) -> dict[str, tuple[str, TimeSeries] | None]:
  """The first matching ('container/name', series) per LOOKUPS entry; None if missing='nan'."""
  candidates, sources = _behavior_candidates(nwbfile), {}
  for channel, (groups, exclude) in LOOKUPS.items():
    sources[channel] = next(((n, s) for n, s in candidates if _matches(n, groups, exclude)), None)
    if sources[channel] is None and missing == 'error':
      words = ' and '.join('/'.join(repr(w) for w in group) for group in groups)
      raise ValueError(f'no {channel} in {path}: looked for a TimeSeries whose name has {words} '
                       f'in {BEHAVIOR_PLACES} (found {[n for n, _ in candidates] or "none"}); '
                       "pass missing_behavior='nan' (--missing_behavior nan) to import it as NaN")
  return sources


def _aligned(source, width: int, times_T, path) -> np.ndarray:
  """[T, width] of the source series on the neural clock (all NaN without a source)."""
  if source is None:
    return np.full((len(times_T), width), np.nan, np.float32)
  name, series = source
  values_SxC, times_S = _values(series), _times(series)
  if values_SxC.shape[1] < width or len(values_SxC) != len(times_S):
    raise ValueError(f'behaviour series {name} in {path} has data {values_SxC.shape} and '
                     f'{len(times_S)} timestamps; expected [S, {width}] with S timestamps')
  try:
    return neural.align_behavior(times_T, times_S, values_SxC[:, :width])
  except ValueError as e:
    raise ValueError(f'behaviour series {name} in {path}: {e}') from None


def _behavior_TxC(sources, times_T, rate: float, path) -> np.ndarray:
  """[T, 5] in neural.CHANNELS order on the neural clock; pupil_size_change = d size / dt."""
  position_Tx2 = _aligned(sources['pupil_x/pupil_y'], 2, times_T, path)
  size_T = _aligned(sources['pupil_size'], 1, times_T, path)[:, 0]
  change_T = np.gradient(size_T) * rate if len(size_T) > 1 else np.full_like(size_T, np.nan)
  channels = {'pupil_x': position_Tx2[:, 0], 'pupil_y': position_Tx2[:, 1], 'pupil_size': size_T,
              'pupil_size_change': change_T,
              'running_speed': _aligned(sources['running_speed'], 1, times_T, path)[:, 0]}
  return np.stack([channels[c] for c in neural.CHANNELS], axis=1).astype(np.float32)


# ---------------------------------------------------------------- stimulus frames

def _resize_matrix(source: int, target: int) -> np.ndarray:
  """[target, source] weights: area averaging when shrinking, linear interpolation when growing."""
  if source == 1:
    return np.ones((target, 1))
  if target <= source:
    edges = np.arange(target + 1) * source / target
    pixel = np.arange(source)[None]
    overlap = np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel)
    return np.clip(overlap, 0, None) * target / source
  centres = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
  left = np.minimum(np.floor(centres).astype(int), source - 2)
  weights = np.zeros((target, source))
  weights[np.arange(target), left] = 1 - (centres - left)
  weights[np.arange(target), left + 1] = centres - left
  return weights


def _gray_resized(frames, frame_shape, where: str) -> np.ndarray:
  """[F, h, w] float32 luminance of [F, H, W] or [F, H, W, 3] frames, resized to frame_shape."""
  frames = np.asarray(frames, np.float32)
  if frames.ndim == 4 and frames.shape[3] == 3:
    frames = frames @ LUMA
  if frames.ndim != 3:
    raise ValueError(f'{where} has frames of shape {frames.shape[1:]}; expected [H, W] or '
                     '[H, W, 3]')
  rows_hxH = _resize_matrix(frames.shape[1], frame_shape[0]).astype(np.float32)
  cols_wxW = _resize_matrix(frames.shape[2], frame_shape[1]).astype(np.float32)
  return rows_hxH @ frames @ cols_wxW.T


def _uint8(frames_FxHxW: np.ndarray, unit_range: bool) -> np.ndarray:
  """0..255 uint8 (NaN 0); unit_range frames (float data in [0, 1]) are scaled by 255 first."""
  frames_FxHxW = np.nan_to_num(frames_FxHxW * (255 if unit_range else 1))
  return np.clip(np.rint(frames_FxHxW), 0, 255).astype(np.uint8)


def _block(frame_shape) -> int:
  """Frames of this shape per block of FRAME_VALUES values."""
  return max(1, FRAME_VALUES // math.prod(frame_shape))


def _series_frames(series: ImageSeries, frame_shape, path, progress) -> np.ndarray:
  where, chunks = f'stimulus {series.name!r} in {path}', []
  with tqdm.tqdm(total=len(series.data), desc=f'read {series.name}', unit='frame',
                 disable=not progress) as bar:
    block = _block(series.data.shape[1:])
    for a in range(0, len(series.data), block):
      chunks.append(_gray_resized(series.data[a:a + block], frame_shape, where))
      bar.update(len(chunks[-1]))
  frames = np.concatenate(chunks)
  return _uint8(frames, series.data.dtype.kind == 'f' and np.nanmax(frames) <= 1)


def _movie_frames(movie: pathlib.Path, frame_shape, progress) -> np.ndarray:
  """Every frame of a video file (PyAV), gray and resized, [F, h, w] uint8."""
  if not movie.is_file():
    raise ValueError(f'movie {movie} is not a file; expected a video file PyAV reads')
  chunks, chunk = [], []
  with av.open(str(movie)) as container:
    stream = container.streams.video[0]
    for frame in tqdm.tqdm(container.decode(stream), total=stream.frames or None,
                           desc=f'read {movie.name}', unit='frame', disable=not progress):
      chunk.append(frame.to_ndarray(format='rgb24'))
      if len(chunk) == _block(chunk[0].shape):
        chunks.append(_gray_resized(np.stack(chunk), frame_shape, f'movie {movie}'))
        chunk = []
  if chunk:
    chunks.append(_gray_resized(np.stack(chunk), frame_shape, f'movie {movie}'))
  if not chunks:
    raise ValueError(f'movie {movie} has no frames; expected a video')
  return _uint8(np.concatenate(chunks), False)


def _stimulus_source(nwbfile, path: pathlib.Path, movie, movie_times):
  """(in-file ImageSeries, or None; movie path or None; movie times or None), checked."""
  series = [s for s in nwbfile.stimulus.values() if isinstance(s, ImageSeries)]
  internal = [s for s in series if s.data is not None and len(s.data)]
  external = [s for s in series if s.external_file is not None and len(s.external_file)]
  if movie is None and not internal and external:
    movie = path.parent / _text(external[0].external_file[0])
  if movie is None:
    if not internal:
      raise ValueError(f'no stimulus frames in {path}: expected an ImageSeries/OpticalSeries in '
                       'nwbfile.stimulus (data [F, H, W] or [F, H, W, 3]), or movie=PATH (--movie)')
    return internal, None, None
  if movie_times is None and external and external[0].timestamps is not None:
    movie_times = external[0].timestamps[:]
  if movie_times is None:
    raise ValueError(f'movie {movie} has no frame times: pass movie_times (--movie_times), or '
                     f'give {path} an external ImageSeries with timestamps in nwbfile.stimulus')
  return None, pathlib.Path(movie), np.asarray(movie_times, np.float64)


def _stimulus(source, path, frame_shape, progress) -> tuple[np.ndarray, np.ndarray]:
  """(frames [F, h, w] uint8, their times [F]) in time order."""
  internal, movie, movie_times = source
  if movie is not None:
    frames = _movie_frames(movie, frame_shape, progress)
    if len(frames) != len(movie_times):
      raise ValueError(f'movie {movie} has {len(frames)} frames and {len(movie_times)} frame '
                       'times; expected one time per frame')
    return frames, movie_times
  frames = np.concatenate([_series_frames(s, frame_shape, path, progress) for s in internal])
  times_F = np.concatenate([_times(s) for s in internal])
  order = np.argsort(times_F, kind='stable')
  return frames[order], times_F[order]


# ---------------------------------------------------------------- trials

def _stimulus_ids(values) -> np.ndarray:
  """Integer ids as they are; other values numbered in order of first appearance."""
  values = np.asarray(values)
  if values.dtype.kind in 'iu':
    return values.astype(np.int64)
  ids = {}
  return np.array([ids.setdefault(_text(v), len(ids)) for v in values], np.int64)


def _trials(nwbfile, times_T) -> tuple[dict, int]:
  """(trials as sample indices [start, stop) on times_T, trials left out as empty there)."""
  if nwbfile.trials is None or not len(nwbfile.trials):
    return {'start': [0], 'stop': [len(times_T)], 'tier': ['train'], 'stimulus': [0]}, 0
  table = nwbfile.trials
  start = np.searchsorted(times_T, table['start_time'].data[:], 'left')
  stop = np.searchsorted(times_T, table['stop_time'].data[:], 'left')
  tier = ([_text(t) for t in table['tier'].data[:]] if 'tier' in table.colnames
          else ['train'] * len(start))
  stimulus = (_stimulus_ids(table['stimulus'].data[:]) if 'stimulus' in table.colnames
              else np.arange(len(start)))
  keep = stop > start
  return {'start': start[keep], 'stop': stop[keep], 'tier': [t for t, k in zip(tier, keep) if k],
          'stimulus': stimulus[keep]}, int(np.sum(~keep))


# ---------------------------------------------------------------- the import

def _check_options(rate: float, frame_shape, missing_behavior: str):
  if not rate > 0:
    raise ValueError(f'rate {rate}; expected samples per second > 0')
  if len(frame_shape) != 2 or min(frame_shape) < 1:
    raise ValueError(f'frame_shape {tuple(frame_shape)}; expected (height, width), both ≥ 1')
  if missing_behavior not in ('error', 'nan'):
    raise ValueError(f"missing_behavior={missing_behavior!r}; expected 'error' or 'nan'")


def import_nwb(path, root, *, session: str | None = None, animal: str | None = None,
               rate: float = 30.0, frame_shape=(36, 64), movie=None, movie_times=None,
               missing_behavior: str = 'error', progress: bool = True,
               overwrite: bool = False) -> str:
  """Imports one NWB file as a session of the store at root; returns the session's name.

  session defaults to the file's stem, animal to the file's subject_id (else the session).
  movie: a video file of the stimulus (PyAV); its frame times are movie_times, else the
  timestamps of an ImageSeries in nwbfile.stimulus whose data is that external file.
  missing_behavior: 'error' raises for a channel not found, 'nan' imports it as all-NaN.
  """
  path = pathlib.Path(path)
  _check_options(rate, frame_shape, missing_behavior)
  if not path.is_file():
    raise ValueError(f'NWB file {path} is not a file; expected an NWB (HDF5) file')
  name = session or path.stem
  neural.check_fits(root, name, rate=rate, frame_shape=frame_shape, overwrite=overwrite)
  with pynwb.NWBHDF5IO(str(path), 'r') as io:
    nwbfile = io.read()
    source = _neural_source(nwbfile, path)
    stimulus_source = _stimulus_source(nwbfile, path, movie, movie_times)
    behavior_sources = _behavior_sources(nwbfile, path, missing_behavior)
    data = (_calcium(source, path, rate, progress) if isinstance(source, RoiResponseSeries)
            else _spikes(source, path, _trial_span(nwbfile), rate, progress))
    times_T = data.start_time + np.arange(len(data.responses_TxN)) / rate
    behavior_TxC = _behavior_TxC(behavior_sources, times_T, rate, path)
    frames_FxHxW, frame_times_F = _stimulus(stimulus_source, path, tuple(frame_shape), progress)
    trials, dropped = _trials(nwbfile, times_T)
    animal = animal or (nwbfile.subject and nwbfile.subject.subject_id) or name
  neural.write_session(
      root, name, animal=animal, rate=rate, responses_TxN=data.responses_TxN,
      frames_FxHxW=frames_FxHxW, frame_times_F=frame_times_F, behavior_SxC=behavior_TxC,
      behavior_times_S=times_T, unit_ids=data.unit_ids, trials=trials,
      positions_Nx3=data.positions_Nx3, areas=data.areas, start_time=data.start_time,
      overwrite=overwrite)
  if progress:
    kind = 'calcium traces' if isinstance(source, RoiResponseSeries) else 'binned spikes'
    print(f'brainscale: imported {path} as session {name!r} of {root}: {kind} of '
          f'{len(data.unit_ids)} neurons, {len(times_T)} samples, {len(frames_FxHxW)} frames, '
          f'{len(trials["start"])} trials; left out {dropped} trials outside the recording')
  return name


def _frame_shape(text: str) -> tuple[int, int]:
  height, width = (int(v) for v in text.split(','))
  return height, width


def _load_times(text: str) -> np.ndarray:
  """Frame times from a .npy file, else a text file of numbers."""
  return np.load(text, allow_pickle=False) if text.endswith('.npy') else np.loadtxt(text, ndmin=1)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m brainscale.data.importers.nwb',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('path', metavar='FILE', help='NWB file (HDF5)')
  parser.add_argument('root', metavar='ROOT', help='neural store to add the session to')
  parser.add_argument('--session', help='session name; default: the file name without .nwb')
  parser.add_argument('--animal', help='animal name; default: the subject_id of the file')
  parser.add_argument('--rate', type=float, default=30.0, help='neural samples per second')
  parser.add_argument('--frame_shape', type=_frame_shape, default=(36, 64), help='H,W')
  parser.add_argument('--movie', help='video file of the stimulus, if not inside FILE')
  parser.add_argument('--movie_times', help='.npy or text file: seconds of each movie frame')
  parser.add_argument('--missing_behavior', choices=('error', 'nan'), default='error')
  parser.add_argument('--overwrite', action='store_true', help='replace a session of that name')
  parser.add_argument('--quiet', action='store_true', help='no progress bars or summary')
  args = parser.parse_args(argv)
  try:
    movie_times = None if args.movie_times is None else _load_times(args.movie_times)
    import_nwb(args.path, args.root, session=args.session, animal=args.animal, rate=args.rate,
               frame_shape=args.frame_shape, movie=args.movie, movie_times=movie_times,
               missing_behavior=args.missing_behavior, progress=not args.quiet,
               overwrite=args.overwrite)
  except (OSError, ValueError) as e:
    print(f'brainscale: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
