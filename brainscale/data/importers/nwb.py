"""An NWB file → a neural store session: calcium traces or spikes, pupil and running, stimulus.

  python -m brainscale.data.importers.nwb FILE ROOT [--session NAME] [--movie PATH] [--rate 30]

Calcium traces (processing['ophys']: DfOverF, else Fluorescence, else a RoiResponseSeries) are
linearly resampled to `rate`; without them the units table's spike times are binned at `rate`.
Behaviour is aligned to that clock per channel; stimulus frames keep theirs (the store aligns);
both are read by nwb_readers.py.
Trials take the tiers of a 'tier' column; without one, the 5th and 10th of every 10 trials in
time order are validation and test (a file without trials is cut into 10 equal trials first).
"""

import argparse
import contextlib
import dataclasses
import pathlib
import sys

import numpy as np
import pynwb
import tqdm
from pynwb.ophys import DfOverF, Fluorescence, RoiResponseSeries

from brainscale.data import neural
from brainscale.data.importers import InputError, failed, nwb_readers, store_errors

CHUNK = 4096   # neural samples resampled per read
POSITION_COLUMNS = ('position', 'positions', 'centroid', 'center', 'xyz')
AREA_COLUMNS = ('area', 'brain_area', 'location')
HELD_OUT = {4: 'validation', 9: 'test'}   # trial position mod 10 → tier, for a file without tiers
PIECES = 10   # equal trials a recording without a trials table is cut into
READ_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError)   # h5py/hdmf, bad files


@dataclasses.dataclass
class _Neural:
  responses_TxN: np.ndarray
  start_time: float   # seconds of sample 0 on the NWB clock
  unit_ids: list[str]
  positions_Nx3: np.ndarray
  areas: list[str] | None


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
      return [nwb_readers._text(v) for v in np.asarray(table[name].data[:])[rows]]
  return None if default is None else [default] * len(rows)


def _grid_interpolation(times_S: np.ndarray, rate: float, where: str):
  """(grid times [T], left sample [T], weight of the right sample [T]) of a regular grid."""
  if len(times_S) < 2 or not np.all(np.diff(times_S) > 0):
    raise InputError(f'{where} has {len(times_S)} timestamps; expected at least 2, increasing')
  count = int(np.floor((times_S[-1] - times_S[0]) * rate + 1e-6)) + 1
  grid_T = times_S[0] + np.arange(count) / rate
  right_T = np.clip(np.searchsorted(times_S, grid_T, 'right'), 1, len(times_S) - 1)
  weight_T = (grid_T - times_S[right_T - 1]) / (times_S[right_T] - times_S[right_T - 1])
  return grid_T, right_T - 1, np.clip(weight_T, 0, 1)


def _resampled(series: RoiResponseSeries, rate: float, where: str, progress) -> np.ndarray:
  """[T, N] float32 linear interpolation at `rate` from the first timestamp; NaN stays NaN."""
  times_S = nwb_readers._times(series)
  if series.data.shape[0] != len(times_S):
    raise InputError(f'{where} has {series.data.shape[0]} samples and {len(times_S)} '
                     'timestamps; expected one per sample')
  grid_T, left_T, weight_T = _grid_interpolation(times_S, rate, where)
  out_TxN = np.empty((len(grid_T), nwb_readers._values(series, slice(0, 1)).shape[1]), np.float32)
  with tqdm.tqdm(total=len(grid_T), desc='resample calcium', unit='sample',
                 disable=not progress) as bar:
    for a in range(0, len(grid_T), CHUNK):
      b = min(a + CHUNK, len(grid_T))
      first = left_T[a]
      block_SxN = nwb_readers._values(series, slice(first, left_T[b - 1] + 2))
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
    raise InputError(f'{where} has {responses_TxN.shape[1]} traces and {len(rows)} rois; '
                     'expected one roi per trace')
  table = series.rois.table
  plane = getattr(table, 'imaging_plane', None)
  return _Neural(responses_TxN, float(nwb_readers._times(series)[0]),
                 [nwb_readers._text(u) for u in np.asarray(table.id.data[:])[rows]],
                 _positions_Nx3(table, rows), _areas(table, rows, plane and plane.location))


def _spikes(units, path, span: tuple[float, float], rate: float, progress) -> _Neural:
  """Spike counts in bins of 1 / rate over the spikes and trials; timestamps at bin centres."""
  if 'spike_times' not in units.colnames:
    raise InputError(f'units table of {path} has no spike_times column; expected one')
  ends = np.asarray(units.spike_times_index.data[:], np.int64)
  times = np.asarray(units.spike_times.data[:], np.float64)
  if not len(times) and span[0] > span[1]:
    raise InputError(f'units table of {path} holds no spikes and {path} no trials; '
                     'expected spikes to bin')
  first = min(span[0], times.min(initial=np.inf))
  count = int(np.floor((max(span[1], times.max(initial=-np.inf)) - first) * rate)) + 1
  counts_TxN = np.empty((count, len(ends)), np.float32)
  for n in tqdm.trange(len(ends), desc='bin spikes', unit='unit', disable=not progress):
    spikes = times[(ends[n - 1] if n else 0):ends[n]]
    counts_TxN[:, n] = np.bincount(np.floor((spikes - first) * rate).astype(np.int64),
                                   minlength=count)
  rows = np.arange(len(ends))
  return _Neural(counts_TxN, first + 0.5 / rate, [nwb_readers._text(u) for u in units.id.data[:]],
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
    raise InputError('no calcium traces (processing/ophys DfOverF/Fluorescence/RoiResponseSeries) '
                     f'and no units table in {path}')
  return series if series is not None else nwbfile.units


# ---------------------------------------------------------------- trials

def _stimulus_ids(values) -> np.ndarray:
  """Integer ids as they are; other values numbered in order of first appearance."""
  values = np.asarray(values)
  if values.dtype.kind in 'iu':
    return values.astype(np.int64)
  ids = {}
  return np.array([ids.setdefault(nwb_readers._text(v), len(ids)) for v in values], np.int64)


def _positional_tiers(start_K: np.ndarray) -> list[str]:
  """Tiers by position in time: of every 10 trials, the 5th is validation, the 10th test."""
  position_K = np.argsort(np.argsort(start_K, kind='stable'), kind='stable')
  return [HELD_OUT.get(int(k) % 10, 'train') for k in position_K]


def _pieces(count: int) -> dict:
  """The recording [0, count) cut into PIECES equal trials (empty ones left out)."""
  edges = np.round(np.linspace(0, count, PIECES + 1)).astype(np.int64)
  keep = edges[1:] > edges[:-1]
  return {'start': edges[:-1][keep], 'stop': edges[1:][keep], 'stimulus': np.arange(keep.sum())}


def _tiers(table, keep, path) -> list[str] | None:
  """The kept trials' 'tier' column, checked; None without one."""
  if 'tier' not in table.colnames:
    return None
  tiers = [nwb_readers._text(t) for t in np.asarray(table['tier'].data[:])[keep]]
  bad = next((k for k, t in enumerate(tiers) if t not in neural.TIERS), None)
  if bad is not None:
    raise InputError(f'trial {np.flatnonzero(keep)[bad]} of {path} has tier {tiers[bad]!r}; '
                     f'expected one of {neural.TIERS}')
  return tiers


def _trials(nwbfile, times_T, path) -> tuple[dict, int, str]:
  """(trials as sample indices [start, stop) on times_T, trials left out as empty there,
  where their tiers came from: 'column', 'position' or 'pieces')."""
  if nwbfile.trials is None or not len(nwbfile.trials):
    trials = _pieces(len(times_T))
    return {**trials, 'tier': _positional_tiers(trials['start'])}, 0, 'pieces'
  table = nwbfile.trials
  start = np.searchsorted(times_T, table['start_time'].data[:], 'left')
  stop = np.searchsorted(times_T, table['stop_time'].data[:], 'left')
  stimulus = (_stimulus_ids(table['stimulus'].data[:]) if 'stimulus' in table.colnames
              else np.arange(len(start)))
  keep = stop > start
  tiers = _tiers(table, keep, path)
  trials = {'start': start[keep], 'stop': stop[keep], 'stimulus': stimulus[keep],
            'tier': tiers or _positional_tiers(start[keep])}
  return trials, int(np.sum(~keep)), 'position' if tiers is None else 'column'


TIER_RULES = {'column': '',
              'position': '; no tier column, so the 5th and 10th of every 10 trials in time '
                          'order are validation and test',
              'pieces': '; no trials table, so the recording was cut into 10 equal trials, the '
                        '5th validation and the 10th test'}


def _trial_summary(trials: dict, dropped: int, rule: str) -> str:
  """'12 trials (train 10, validation 1, test 1); left out 0 trials ...[; how tiers were set]'."""
  counts = ', '.join(f'{t} {trials["tier"].count(t)}' for t in neural.TIERS
                     if t in trials['tier'])
  return (f'{len(trials["start"])} trials ({counts}); left out {dropped} trials outside the '
          f'recording{TIER_RULES[rule]}')


# ---------------------------------------------------------------- the import

def _check_options(rate: float, frame_shape, missing_behavior: str):
  if not rate > 0:
    raise InputError(f'rate {rate}; expected samples per second > 0')
  if len(frame_shape) != 2 or min(frame_shape) < 1:
    raise InputError(f'frame_shape {tuple(frame_shape)}; expected (height, width), both ≥ 1')
  if missing_behavior not in ('error', 'nan'):
    raise InputError(f"missing_behavior={missing_behavior!r}; expected 'error' or 'nan'")


def _unreadable(path: pathlib.Path, error: Exception) -> InputError:
  return InputError(f'{path} is not a readable NWB file ({type(error).__name__}: {error}); '
                    'expected a whole NWB 2 (HDF5) file')


@contextlib.contextmanager
def _nwb_file(path: pathlib.Path):
  """The NWBFile at path, open for reading; what HDF5 or NWB cannot read is an InputError."""
  try:
    io = pynwb.NWBHDF5IO(str(path), 'r')
  except READ_ERRORS as e:
    raise _unreadable(path, e) from None
  with io:
    try:
      nwbfile = io.read()
    except READ_ERRORS as e:
      raise _unreadable(path, e) from None
    try:
      yield nwbfile
    except (OSError, RuntimeError) as e:   # h5py on a damaged dataset
      raise InputError(f'{path} is damaged: reading it failed ({type(e).__name__}: {e})') from None


@dataclasses.dataclass
class _Session:
  """What import_nwb writes: the file read and put on the neural clock."""
  data: _Neural
  kind: str   # 'calcium traces' or 'binned spikes'
  times_T: np.ndarray
  behavior_TxC: np.ndarray
  frames_FxHxW: np.ndarray
  frame_times_F: np.ndarray
  trials: dict
  summary: str   # of the trials and their tiers
  animal: str | None   # the file's subject_id


def _read_session(nwbfile, path, *, rate, frame_shape, movie, movie_times, missing_behavior,
                  progress) -> _Session:
  source = _neural_source(nwbfile, path)
  stimulus_source = nwb_readers._stimulus_source(nwbfile, path, movie, movie_times)
  behavior_sources = nwb_readers._behavior_sources(nwbfile, path, missing_behavior)
  calcium = isinstance(source, RoiResponseSeries)
  data = (_calcium(source, path, rate, progress) if calcium
          else _spikes(source, path, _trial_span(nwbfile), rate, progress))
  times_T = data.start_time + np.arange(len(data.responses_TxN)) / rate
  behavior_TxC = nwb_readers._behavior_TxC(behavior_sources, times_T, rate, path)
  frames_FxHxW, frame_times_F = nwb_readers._stimulus(stimulus_source, path,
                                                    tuple(frame_shape), progress)
  trials, dropped, rule = _trials(nwbfile, times_T, path)
  return _Session(data, 'calcium traces' if calcium else 'binned spikes', times_T, behavior_TxC,
                  frames_FxHxW, frame_times_F, trials, _trial_summary(trials, dropped, rule),
                  nwbfile.subject and nwbfile.subject.subject_id)


def import_nwb(path, root, *, session: str | None = None, animal: str | None = None,
               rate: float = 30.0, frame_shape=(36, 64), movie=None, movie_times=None,
               missing_behavior: str = 'error', progress: bool = True,
               overwrite: bool = False) -> str:
  """Imports one NWB file as a session of the store at root; returns the session's name.

  session defaults to the file's stem, animal to the file's subject_id (else the session).
  movie: a video file of the stimulus (PyAV); its frame times are movie_times, else the
  timestamps of an ImageSeries in nwbfile.stimulus whose data is that external file.
  missing_behavior: 'error' raises for a channel not found, 'nan' imports it as all-NaN.
  Without a 'tier' column trials get tiers by position (see the module docstring); what
  cannot be read or used raises InputError naming the file.
  """
  path = pathlib.Path(path)
  _check_options(rate, frame_shape, missing_behavior)
  if not path.is_file():
    raise InputError(f'NWB file {path} is not a file; expected an NWB (HDF5) file')
  name = session or path.stem
  with store_errors(path):
    neural.check_fits(root, name, rate=rate, frame_shape=frame_shape, overwrite=overwrite)
  with _nwb_file(path) as nwbfile:
    read = _read_session(nwbfile, path, rate=rate, frame_shape=frame_shape, movie=movie,
                         movie_times=movie_times, missing_behavior=missing_behavior,
                         progress=progress)
  with store_errors(path):
    neural.write_session(
        root, name, animal=animal or read.animal or name, rate=rate,
        responses_TxN=read.data.responses_TxN, frames_FxHxW=read.frames_FxHxW,
        frame_times_F=read.frame_times_F, behavior_SxC=read.behavior_TxC,
        behavior_times_S=read.times_T, unit_ids=read.data.unit_ids, trials=read.trials,
        positions_Nx3=read.data.positions_Nx3, areas=read.data.areas,
        start_time=read.data.start_time, overwrite=overwrite)
  if progress:
    print(f'brainscale: imported {path} as session {name!r} of {root}: {read.kind} of '
          f'{len(read.data.unit_ids)} neurons, {len(read.times_T)} samples, '
          f'{len(read.frames_FxHxW)} frames, {read.summary}')
  return name


def _frame_shape(text: str) -> tuple[int, int]:
  height, width = (int(v) for v in text.split(','))
  return height, width


def _load_times(text: str) -> np.ndarray:
  """Frame times from a .npy file, else a text file of numbers."""
  try:
    if text.endswith('.npy'):
      return np.load(text, allow_pickle=False)
    return np.loadtxt(text, ndmin=1)
  except (OSError, ValueError) as e:
    raise InputError(f'movie times {text} cannot be read ({type(e).__name__}: {e}); expected '
                     'a .npy file or a text file of seconds') from None


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
  except (InputError, OSError) as e:
    return failed(e)
  return 0


if __name__ == '__main__':
  sys.exit(main())
