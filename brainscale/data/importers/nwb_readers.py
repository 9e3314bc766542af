"""The behaviour and stimulus frames of an NWB file, for importers/nwb.py, which reads the
neural activity and trials with the same series helpers (_text, _times, _values).

Behaviour series are found by the words of their names (LOOKUPS) and aligned to the neural
clock; stimulus frames (in-file ImageSeries, or a movie file) turn gray and resized, uint8.
Shape key: S samples of a series, C its columns, T samples of the neural clock, F stimulus
frames of H x W pixels (h x w once resized).
"""

import math
import pathlib

import av
import numpy as np
import tqdm
from pynwb.base import TimeSeries
from pynwb.ecephys import ElectricalSeries
from pynwb.image import ImageSeries
from pynwb.ophys import RoiResponseSeries

from brainscale.data import neural
from brainscale.data import video as video_lib
from brainscale.data.behavior import behavior_TxC, uint8_frames
from brainscale.data.importers import InputError

FRAME_VALUES = 1 << 24   # stimulus pixel values converted per block (64 MB as float32)
EYE = ('pupil', 'eye')
# behaviour series, found by the words of their 'container/name' path: one word of each group
# and none of the excluded words; the first place with a match gives the shortest such name
LOOKUPS = {'pupil_x/pupil_y': ((EYE, ('position', 'center', 'centre')), ()),
           'pupil_size': ((EYE, ('size', 'area', 'diameter')), ()),
           'running_speed': ((('running', 'speed', 'velocity'),), EYE + ('end_time', 'rotation'))}
BEHAVIOR_MODULES = ('behavior', 'behaviour', 'running', 'eye_tracking')   # searched first
BEHAVIOR_PLACES = ("processing['behavior'], ['running'] and ['eye_tracking'], then acquisition, "
                   'then the other processing modules')
NOT_BEHAVIOR = (ImageSeries, RoiResponseSeries, ElectricalSeries)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)   # ITU-R BT.601


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _times(series: TimeSeries) -> np.ndarray:
  """Seconds of each sample: the timestamps, or starting_time + i / rate."""
  return np.asarray(series.get_timestamps(), np.float64)


def _values(series: TimeSeries, rows=slice(None)) -> np.ndarray:
  """data[rows] in the series' unit (conversion and offset applied), float32 2D."""
  data_SxC = np.asarray(series.data[rows], np.float32) * series.conversion + series.offset
  return data_SxC.reshape(len(data_SxC), -1).astype(np.float32)


# ---------------------------------------------------------------- behaviour

def _behavior_places(nwbfile) -> list[tuple[str, dict]]:
  """(place, its data interfaces) in search order: BEHAVIOR_MODULES, acquisition, the rest."""
  modules = nwbfile.processing
  first = [m for m in BEHAVIOR_MODULES if m in modules]
  rest = sorted(m for m in modules if m not in first)
  place = lambda m: (f"processing['{m}']", modules[m].data_interfaces)
  return [place(m) for m in first] + [('acquisition', nwbfile.acquisition)] + [
      place(m) for m in rest]


def _behavior_candidates(nwbfile) -> list[tuple[str, str, TimeSeries]]:
  """(place, 'container/name', series) of each TimeSeries that may be behaviour, in search
  order; containers (BehavioralTimeSeries, EyeTracking, PupilTracking, ...) are opened."""
  found = []
  for place, interfaces in _behavior_places(nwbfile):
    for name, obj in interfaces.items():
      children = [(name, obj)] if isinstance(obj, TimeSeries) else [
          (f'{name}/{c.name}', c) for c in obj.children if isinstance(c, TimeSeries)]
      found += [(place, n, s) for n, s in children if not isinstance(s, NOT_BEHAVIOR)]
  return found


def _matches(name: str, groups, exclude) -> bool:
  name = name.lower()
  return all(any(w in name for w in group) for group in groups) and not any(
      w in name for w in exclude)


def _best(candidates, groups, exclude) -> tuple[str, TimeSeries] | None:
  """('place/container/name', series): in the first place with a match, the shortest name."""
  matches = [(place, n, s) for place, n, s in candidates if _matches(n, groups, exclude)]
  if not matches:
    return None
  place, name, series = min((m for m in matches if m[0] == matches[0][0]),
                            key=lambda m: len(m[1]))
  return f'{place}/{name}', series


def _behavior_sources(nwbfile, path, missing: str) -> dict[str, tuple[str, TimeSeries] | None]:
  """The chosen ('place/container/name', series) per LOOKUPS entry; None if missing='nan'."""
  candidates, sources = _behavior_candidates(nwbfile), {}
  for channel, (groups, exclude) in LOOKUPS.items():
    sources[channel] = _best(candidates, groups, exclude)
    if sources[channel] is None and missing == 'error':
      words = ' and '.join('/'.join(repr(w) for w in group) for group in groups)
      found = [f'{place}/{n}' for place, n, _ in candidates]
      listed = ', '.join(found[:12]) + (f' and {len(found) - 12} more' if len(found) > 12 else '')
      raise InputError(f'no {channel} in {path}: looked for a TimeSeries whose name has {words} '
                       f'in {BEHAVIOR_PLACES} (found {listed or "none"}); '
                       "pass missing_behavior='nan' (--missing_behavior nan) to import it as NaN")
  return sources


def _aligned(source, width: int, times_T, path) -> np.ndarray:
  """[T, width] of the source series on the neural clock (all NaN without a source)."""
  if source is None:
    return np.full((len(times_T), width), np.nan, np.float32)
  name, series = source
  values_SxC, times_S = _values(series), _times(series)
  if values_SxC.shape[1] < width or len(values_SxC) != len(times_S):
    raise InputError(f'behaviour series {name} in {path} has data {values_SxC.shape} and '
                     f'{len(times_S)} timestamps; expected [S, {width}] with S timestamps')
  try:
    return neural.align_behavior(times_T, times_S, values_SxC[:, :width])
  except ValueError as e:
    raise InputError(f'behaviour series {name} in {path}: {e}') from None


def _behavior_TxC(sources, times_T, rate: float, path) -> np.ndarray:
  """[T, 5] in CHANNELS order on the neural clock; pupil_size_change = d size / dt."""
  position_Tx2 = _aligned(sources['pupil_x/pupil_y'], 2, times_T, path)
  return behavior_TxC(
      pupil_x_T=position_Tx2[:, 0], pupil_y_T=position_Tx2[:, 1],
      pupil_size_T=_aligned(sources['pupil_size'], 1, times_T, path)[:, 0],
      running_speed_T=_aligned(sources['running_speed'], 1, times_T, path)[:, 0], rate=rate)


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
    raise InputError(f'{where} has frames of shape {frames.shape[1:]}; expected [H, W] or '
                     '[H, W, 3]')
  rows_hxH = _resize_matrix(frames.shape[1], frame_shape[0]).astype(np.float32)
  cols_wxW = _resize_matrix(frames.shape[2], frame_shape[1]).astype(np.float32)
  return rows_hxH @ frames @ cols_wxW.T


def _uint8(frames_FxHxW: np.ndarray, unit_range: bool) -> np.ndarray:
  """0..255 uint8 (NaN 0); unit_range frames (float data in [0, 1]) are scaled by 255 first."""
  return uint8_frames(frames_FxHxW, 255 if unit_range else 1)


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


def _movie_rgb(movie: pathlib.Path):
  """Every frame of a video file (PyAV) as players show it (display rotation applied), RGB."""
  try:
    with av.open(str(movie)) as container:
      if not container.streams.video:
        raise InputError(f'movie {movie} has no video stream; expected a video file')
      for frame in container.decode(container.streams.video[0]):
        orientation = video_lib.display_orientation(frame)
        yield video_lib.upright(frame.to_ndarray(format='rgb24'), orientation)
  except InputError:
    raise
  except (av.FFmpegError, OSError) as e:
    raise InputError(f'movie {movie} cannot be decoded ({type(e).__name__}: {e}); expected a '
                     'video file FFmpeg reads') from None
  except ValueError as e:   # a display matrix that is no multiple of 90°
    raise InputError(f'movie {movie}: {e}') from None


def _movie_frames(movie: pathlib.Path, frame_shape, progress) -> np.ndarray:
  """Every frame of a video file (PyAV), upright, gray and resized, [F, h, w] uint8."""
  if not movie.is_file():
    raise InputError(f'movie {movie} is not a file; expected a video file PyAV reads')
  chunks, chunk = [], []
  for rgb_HxWx3 in tqdm.tqdm(_movie_rgb(movie), desc=f'read {movie.name}', unit='frame',
                             disable=not progress):
    chunk.append(rgb_HxWx3)
    if len(chunk) == _block(chunk[0].shape):
      chunks.append(_gray_resized(np.stack(chunk), frame_shape, f'movie {movie}'))
      chunk = []
  if chunk:
    chunks.append(_gray_resized(np.stack(chunk), frame_shape, f'movie {movie}'))
  if not chunks:
    raise InputError(f'movie {movie} has no frames; expected a video')
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
      raise InputError(f'no stimulus frames in {path}: expected an ImageSeries/OpticalSeries in '
                       'nwbfile.stimulus (data [F, H, W] or [F, H, W, 3]), or movie=PATH (--movie)')
    return internal, None, None
  if movie_times is None and external and external[0].timestamps is not None:
    movie_times = external[0].timestamps[:]
  if movie_times is None:
    raise InputError(f'movie {movie} has no frame times: pass movie_times (--movie_times), or '
                     f'give {path} an external ImageSeries with timestamps in nwbfile.stimulus')
  return None, pathlib.Path(movie), np.asarray(movie_times, np.float64)


def _stimulus(source, path, frame_shape, progress) -> tuple[np.ndarray, np.ndarray]:
  """(frames [F, h, w] uint8, their times [F]) in time order."""
  internal, movie, movie_times = source
  if movie is not None:
    frames = _movie_frames(movie, frame_shape, progress)
    if len(frames) != len(movie_times):
      raise InputError(f'movie {movie} has {len(frames)} frames and {len(movie_times)} frame '
                       'times; expected one time per frame')
    return frames, movie_times
  frames = np.concatenate([_series_frames(s, frame_shape, path, progress) for s in internal])
  times_F = np.concatenate([_times(s) for s in internal])
  order = np.argsort(times_F, kind='stable')
  return frames[order], times_F[order]
