"""Encoded-video clips in ArrayRecord shards, decoded by PyAV inside Grain workers.

A folder made by `python -m brainscale.data.importers.videos SOURCE OUT` holds
shard-*.array_record files (one record per clip: H.264 mp4 bytes + a JSON header
+ optional raw arrays such as ground-truth flow) and index.json. Example i of a
pipeline is a pure function of (seed, i), so batches do not depend on the
number of workers and an iterator's state is just its position.
"""

import dataclasses
import io
import json
import math
import pathlib
import struct

import av
import grain
import numpy as np

from brainscale.data import batches

MAGIC = b'BSV1'
IMPORT_COMMAND = 'python -m brainscale.data.importers.videos SOURCE OUT'
_PRIME = 1_000_003   # record r that fails is replaced by r + k * _PRIME (mod records)
_TRIES = 8           # records tried per example before the pipeline gives up
UPRIGHT = (False, False, False)   # display_orientation of a frame shown as decoded
_TURNS = {UPRIGHT: 0, (True, True, False): 90, (False, True, True): 180, (True, False, True): 270}


# ---------------------------------------------------------------- records

def encode_record(header: dict, video: bytes, arrays: dict[str, np.ndarray] | None = None) -> bytes:
  """b'BSV1' + uint32 header length + JSON header + video bytes + raw little-endian arrays."""
  entries, blobs, offset = [], [], len(video)
  for name, array in (arrays or {}).items():
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder('<'), copy=False)
    entries.append({'name': name, 'dtype': array.dtype.str, 'shape': list(array.shape),
                    'offset': offset, 'nbytes': array.nbytes})
    blobs.append(array.tobytes())
    offset += array.nbytes
  header = {**header, 'video_bytes': len(video), 'arrays': entries}
  header_bytes = json.dumps(header, sort_keys=True).encode()
  return b''.join([MAGIC, struct.pack('<I', len(header_bytes)), header_bytes, video, *blobs])


def decode_header(record: bytes) -> dict:
  """The JSON header of a record written by encode_record (the payload is not read)."""
  if record[:4] != MAGIC:
    raise ValueError(f'not a video record: starts with {bytes(record[:4])!r}, '
                     f'expected {MAGIC!r}')
  if len(record) < 8:
    raise ValueError(f'video record truncated: {len(record)} bytes, no header length')
  (header_len,) = struct.unpack('<I', record[4:8])
  if len(record) < 8 + header_len:
    raise ValueError(f'video record truncated: header needs {header_len} bytes, '
                     f'{len(record) - 8} present')
  try:
    return json.loads(record[8:8 + header_len])
  except ValueError as e:
    raise ValueError(f'video record header is not valid JSON ({e})') from None


def decode_record(record: bytes) -> tuple[dict, bytes, dict[str, np.ndarray]]:
  """(header, video bytes, arrays) of a record written by encode_record."""
  header = decode_header(record)
  (header_len,) = struct.unpack('<I', record[4:8])
  payload = memoryview(record)[8 + header_len:]
  ends = [header['video_bytes']] + [a['offset'] + a['nbytes'] for a in header['arrays']]
  if len(payload) < max(ends):
    raise ValueError(f'video record truncated: payload needs {max(ends)} bytes, '
                     f'{len(payload)} present')
  arrays = {}
  for a in header['arrays']:
    chunk = payload[a['offset']:a['offset'] + a['nbytes']]
    arrays[a['name']] = np.frombuffer(chunk, a['dtype']).reshape(a['shape']).copy()
  return header, bytes(payload[:header['video_bytes']]), arrays


# ---------------------------------------------------------------- decoding

def decode_frames(video: bytes, frame_indices: list[int], *, width: int | None = None,
                  height: int | None = None, gop: int | None = None) -> np.ndarray:
  """Frames [F, H, W, 3] uint8 at the given indices of a constant-rate clip, resized if asked.

  Seeks to the keyframe before the first wanted frame and decodes forward. With
  `gop` (the clip's keyframe interval) it seeks again wherever a keyframe lies
  between the decoder's position and the next wanted frame.
  """
  wanted = sorted(set(int(i) for i in frame_indices))
  if not wanted or wanted[0] < 0:
    raise ValueError(f'frame indices must be non-negative, got {list(frame_indices)}')
  found, position = {}, 0   # position: index of the frame the decoder returns next
  with av.open(io.BytesIO(video), mode='r') as container:
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    start, step = stream.start_time or 0, 1 / (stream.average_rate * stream.time_base)
    frames = container.decode(stream)
    for target in wanted:
      if target > position and (position == 0 or gop and target // gop * gop > position):
        container.seek(start + math.floor(target * step), stream=stream)
        frames = container.decode(stream)
      for frame in frames:
        position = round((frame.pts - start) / step) + 1
        if position - 1 >= target:
          break
      if position - 1 == target:
        found[target] = _rgb(frame, width, height)
      else:
        raise ValueError(f'frame {target} is not in this clip '
                         f'(decoding reached frame {position - 1})')
  return np.stack([found[int(i)] for i in frame_indices])


def _rgb(frame: av.VideoFrame, width: int | None, height: int | None) -> np.ndarray:
  """The frame upright (display matrix applied) as RGB [H, W, 3], resized if asked."""
  orientation = display_orientation(frame)
  if orientation == UPRIGHT:   # one thread: a new scaler per call is cheap
    return frame.reformat(width=width, height=height, format='rgb24', threads=1).to_ndarray()
  rgb_HxWx3 = upright(frame.to_ndarray(format='rgb24'), orientation)
  frame = av.VideoFrame.from_ndarray(rgb_HxWx3, format='rgb24')
  return frame.reformat(width=width, height=height, threads=1).to_ndarray()


def display_orientation(frame: av.VideoFrame) -> tuple[bool, bool, bool]:
  """(transpose, flip rows, flip columns) that show a decoded frame as players do.

  Read from the frame's display matrix (phone video: 'rotate' metadata, a rotation
  and mirroring); UPRIGHT without one. Rotations other than multiples of 90° raise.
  """
  side_data = frame.side_data.get('DISPLAYMATRIX')
  if side_data is None:
    return UPRIGHT
  a, b, _, c, d = np.frombuffer(bytes(side_data), np.int32)[:5] / 65536   # 16.16 fixed point
  transpose = abs(b) > abs(a)
  if min(abs(a), abs(b)) > 1e-3 or min(abs(c), abs(d)) > 1e-3:
    degrees = np.degrees(np.arctan2(-b, a))
    raise ValueError(f'display matrix rotates the video by {degrees:.1f} degrees '
                     'counter-clockwise; expected a multiple of 90')
  return (bool(transpose), bool((b if transpose else d) < 0), bool((c if transpose else a) < 0))


def orientation_name(orientation: tuple[bool, bool, bool]) -> str:
  """What a display_orientation does, in words: 'rotated 90° counter-clockwise[, mirrored]'."""
  transpose, flip_rows, flip_columns = orientation
  mirrored = orientation not in _TURNS   # a turn, then the columns flipped
  turn = _TURNS[(transpose, flip_rows, flip_columns != mirrored)]
  return f'rotated {turn}° counter-clockwise' + (', then mirrored left-right' if mirrored else '')


def upright(image_HxWxC: np.ndarray, orientation: tuple[bool, bool, bool]) -> np.ndarray:
  """The image transposed and flipped as display_orientation says, contiguous."""
  transpose, flip_rows, flip_columns = orientation
  image = image_HxWxC.swapaxes(0, 1) if transpose else image_HxWxC
  image = image[::-1] if flip_rows else image
  return np.ascontiguousarray(image[:, ::-1] if flip_columns else image)


def resize_flow(flow_HxWx2: np.ndarray, height: int, width: int) -> np.ndarray:
  """Flow (dx, dy in pixels) bilinearly resampled onto a height x width grid, values rescaled."""
  h, w = flow_HxWx2.shape[:2]
  flow_HxWx2 = np.asarray(flow_HxWx2, np.float32)
  if (h, w) == (height, width):
    return flow_HxWx2
  y0, y1, fy = _taps(h, height)
  x0, x1, fx = _taps(w, width)
  rows = flow_HxWx2[y0] * (1 - fy)[:, None, None] + flow_HxWx2[y1] * fy[:, None, None]
  out_hxwx2 = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
  return out_hxwx2 * np.array([width / w, height / h], np.float32)


def _taps(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source neighbours and weights for resampling n pixel centres onto m (half-pixel aligned)."""
  x = np.clip((np.arange(m) + 0.5) * (n / m) - 0.5, 0, n - 1)
  lo = np.floor(x).astype(np.int64)
  return lo, np.minimum(lo + 1, n - 1), (x - lo).astype(np.float32)


# ---------------------------------------------------------------- Grain source

class ClipSource:
  """Random access to every clip record of an imported video folder; `.index` is index.json."""

  def __init__(self, directory):
    self.directory = pathlib.Path(directory)
    index_path = self.directory / 'index.json'
    if not index_path.is_file():
      raise FileNotFoundError(f'{self.directory} is not an imported video folder '
                              f'(no index.json); run {IMPORT_COMMAND}')
    self.index = json.loads(index_path.read_text())
    if not self.index['clips']:
      raise ValueError(f'{self.directory} holds no clips; see its report.json')
    paths = [f'{self.directory / s["name"]}[0:{s["records"]}]' for s in self.index['shards']]
    self._records = grain.sources.ArrayRecordDataSource(paths)
    self._order = _record_order(self.index)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, record_index: int) -> bytes:
    """The record of clip record_index of the index."""
    if self._order is not None:
      record_index = int(self._order[record_index])
    return self._records[record_index]

  def __repr__(self) -> str:
    return f'ClipSource({str(self.directory)!r}, clips={len(self)})'


def _record_order(index: dict) -> np.ndarray | None:
  """Clip k's position in the shards, one after another, where an import in parts put the
  clips in another order than the index's (each clip then names its shard and record)."""
  if 'record' not in index['clips'][0]:
    return None   # a one-machine import: the shards hold the clips in index order
  starts = np.cumsum([0] + [s['records'] for s in index['shards']])
  return np.array([starts[c['shard']] + c['record'] for c in index['clips']], np.int64)


# ---------------------------------------------------------------- pipeline

def covering(w: int, h: int, size: int, scale: float = 1.0) -> tuple[int, int]:
  """(width, height) of a w x h frame resized to a short side of size * scale (at least size)."""
  short = max(size, round(size * scale))
  return max(size, round(w * short / min(w, h))), max(size, round(h * short / min(w, h)))


def centre_crop(w: int, h: int, size: int) -> tuple[int, int, int, int]:
  """How evaluation sees a w x h frame: (width, height) to resize it to (short side size),
  and the (y0, x0) of the centred size x size crop."""
  width, height = covering(w, h, size)
  return width, height, (height - size) // 2, (width - size) // 2


def gap_frames(gap_ms: float, fps: float) -> int:
  """The gap in frames nearest to gap_ms at this frame rate (halves round up), at least 1."""
  return max(1, math.floor(gap_ms * fps / 1000 + 0.5))


class _SettingsError(ValueError):
  """The pipeline's settings do not fit the data: raised at once, never skipped."""


@dataclasses.dataclass(frozen=True)
class _Examples:
  """Example i of the pipeline, made from record r (or a replacement if r fails to decode)."""
  source: ClipSource
  seed: int
  size: int
  frames: int
  gap_ms: float
  train: bool
  scale: tuple[float, float]
  with_flow: bool
  process_index: int
  process_count: int

  def __call__(self, local_index: int, record_index: int) -> dict:
    index = local_index * self.process_count + self.process_index   # same on any process count
    rng = np.random.default_rng([self.seed, index])
    errors = []
    for k in range(_TRIES):
      r = (record_index + k * _PRIME) % len(self.source)
      try:
        return {**self.example(self.source[r], rng), 'skipped': np.int32(k)}
      except _SettingsError:
        raise
      except Exception as e:  # a broken record is replaced, counted in 'skipped'
        errors.append(f'record {r}: {type(e).__name__}: {e}')
    raise RuntimeError(f'example {index}: {_TRIES} records in a row failed to decode '
                       f'in {self.source.directory}; last: {errors[-1]}')

  def example(self, record: bytes, rng: np.random.Generator) -> dict:
    """Frames gap apart from a uniform start, resized (short side size * s) and cropped."""
    header, video, arrays = decode_record(record)
    gap = gap_frames(self.gap_ms, header['fps'])
    if self.with_flow:
      self.check_flow(header, gap)
    span = (self.frames - 1) * gap + 1
    if header['frames'] < span:
      raise ValueError(f'clip has {header["frames"]} frames; {self.frames} frames {gap} apart '
                       f'need {span}')
    start = int(rng.integers(0, header['frames'] - span + 1))
    width, height, y0, x0 = self.geometry(header['width'], header['height'], rng)
    crop = (slice(y0, y0 + self.size), slice(x0, x0 + self.size))
    frames_FxHxWx3 = decode_frames(video, list(range(start, start + span, gap)), width=width,
                                   height=height, gop=header.get('gop'))
    example = {'frames': np.ascontiguousarray(frames_FxHxWx3[:, crop[0], crop[1]])}
    if self.with_flow:
      flow_HxWx2 = resize_flow(arrays['flow'][start], height, width)
      example['flow'] = np.ascontiguousarray(flow_HxWx2[crop])
    return example

  def geometry(self, w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(width, height) to resize a w x h clip to (short side size * s), and the crop's (y0, x0)."""
    if not self.train:
      return centre_crop(w, h, self.size)
    width, height = covering(w, h, self.size, rng.uniform(*self.scale))
    y0 = int(rng.integers(0, height - self.size + 1))
    return width, height, y0, int(rng.integers(0, width - self.size + 1))

  def check_flow(self, header: dict, gap: int):
    """Raises unless the record carries flow over exactly the sampled gap."""
    where = f'{header["source"]} clip {header["clip"]}'
    if 'flow_gap_frames' not in header:
      raise _SettingsError(f'with_flow=True but {where} has no ground-truth flow '
                           '(import videos with X.flow.npy and X.json sidecars)')
    if header['flow_gap_frames'] != gap:
      fps, flow_gap = header['fps'], header['flow_gap_frames']
      raise _SettingsError(
          f'gap_ms={self.gap_ms} at {fps:g} fps is a gap of {gap} frames, but the '
          f'ground-truth flow of {where} spans {flow_gap} frames; '
          f'use gap_ms={flow_gap * 1000 / fps:g}')


def pipeline(directory, *, seed: int, batch_size: int, process_index: int, process_count: int,
             size: int, frames: int = 2, gap_ms: float = 150.0, train: bool = True,
             workers: int = 0, prefetch: int = 2, scale: tuple[float, float] = (1.0, 1.25),
             with_flow: bool = False, num_epochs: int | None = None) -> grain.IterDataset:
  """Batches of this process: {'frames' uint8 [b, frames, size, size, 3], 'skipped' int32 [b]}.

  b = batch_size // process_count; process p takes examples p, p + P, ... of the
  (shuffled, when train) repeated clip list. with_flow adds 'flow' float32
  [b, size, size, 2], the ground-truth flow from frame 0 to frame 1.
  """
  batches.check_split(batch_size, process_count)
  if with_flow and frames != 2:
    raise ValueError(f'with_flow=True needs frames=2, got frames={frames}')
  source = ClipSource(directory)
  make = _Examples(source, seed=seed, size=size, frames=frames, gap_ms=gap_ms, train=train,
                   scale=tuple(scale), with_flow=with_flow, process_index=process_index,
                   process_count=process_count)
  return batches.batched(make, len(source), seed=seed, batch_size=batch_size,
                         process_index=process_index, process_count=process_count, train=train,
                         num_epochs=num_epochs, prefetch=prefetch, workers=workers)
