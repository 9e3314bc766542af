"""One video file → H.264 clip records (see brainscale.data.video), for importers/videos.py.

A file is decoded, turned upright (its display matrix applied), resized (short side ≤
max_side, even sides) and cut into clips of ≤ clip_seconds, each re-encoded in memory with a
short GOP; X.flow.npy + X.json beside X.ext add ground-truth flow. A worker writes one file's
records into a part file that the import reads back in order.
Shape key: T frames of a video, N frame pairs (t, t + gap) of a clip, H, W height and width.
"""

import dataclasses
import fractions
import io
import json
import math
import os
import pathlib
import struct

import av
import av.logging
import av.video.reformatter
import numpy as np

from brainscale.data import video as video_lib

TAIL_SECONDS = 0.5   # a last clip shorter than this (and than half a clip) is dropped


@dataclasses.dataclass(frozen=True)
class _Options:
  clip_seconds: float
  max_side: int
  crf: int
  gop: int


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
  """(width, height) with the short side ≤ max_side (0: unchanged), aspect kept, both even."""
  factor = min(1.0, max_side / min(width, height)) if max_side else 1.0
  even = lambda x: max(2, 2 * round(x * factor / 2))
  return even(width), even(height)


class _ClipEncoder:
  """H.264 yuv420p mp4 in memory, keyframe every `gop` frames, no B-frames."""

  def __init__(self, width: int, height: int, rate: fractions.Fraction, options: _Options):
    self.buffer = io.BytesIO()
    self.container = av.open(self.buffer, mode='w', format='mp4')
    self.stream = self.container.add_stream('libx264', rate=rate)
    self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, 'yuv420p'
    self.stream.codec_context.gop_size = options.gop
    # mbtree off: with it, x264 output varied between runs of the same input (x264 165)
    self.stream.options = {'crf': str(options.crf), 'bf': '0', 'sc_threshold': '0',
                           'keyint_min': str(options.gop), 'preset': 'fast', 'threads': '1',
                           'x264-params': 'mbtree=0'}
    self.time_base, self.frames = 1 / rate, 0

  def add(self, frame: av.VideoFrame):
    frame.pts, frame.time_base = self.frames, self.time_base
    frame.pict_type = av.video.frame.PictureType.NONE   # keyframes come from gop alone
    self.container.mux(self.stream.encode(frame))
    self.frames += 1

  def finish(self) -> bytes:
    self.container.mux(self.stream.encode(None))
    self.container.close()
    return self.buffer.getvalue()


def _frame_rate(stream) -> fractions.Fraction | None:
  """The stream's average frame rate (variable-rate video is treated as constant-rate)."""
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate and 0 < rate < 1000:
      return fractions.Fraction(rate)
  return None


def _load_flow(path: pathlib.Path) -> tuple[np.ndarray | None, int, str]:
  """(flow [T - gap, H, W, 2], gap, note) from X.flow.npy + X.json beside X.ext, if both exist."""
  flow_path, meta_path = path.with_suffix('.flow.npy'), path.with_suffix('.json')
  if not (flow_path.is_file() and meta_path.is_file()):
    return None, 0, ''
  try:
    gap = int(json.loads(meta_path.read_text())['flow_gap_frames'])
    flow = np.load(flow_path, mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError, KeyError, TypeError) as e:
    return None, 0, f'flow sidecar unreadable ({type(e).__name__}: {e}); imported without flow'
  if flow.ndim != 4 or flow.shape[-1] != 2 or gap < 1:
    return None, 0, f'flow sidecar has shape {flow.shape} and gap {gap}; imported without flow'
  return flow, gap, ''


def _clip_flow(flow, gap: int, first: int, frames: int, size: tuple[int, int]) -> np.ndarray | None:
  """Flow of the frame pairs (t, t + gap) inside the clip, on the clip's grid, float16."""
  count = frames - gap
  if count < 0 or first + count > flow.shape[0]:
    return None
  width, height = size
  flow_NxHxWx2 = np.zeros((count, height, width, 2), np.float16)
  for n in range(count):
    flow_NxHxWx2[n] = video_lib.resize_flow(flow[first + n], height, width)
  return flow_NxHxWx2


class _Clipper:
  """Cuts a stream of decoded frames into clips of per_clip frames; emits a record per clip."""

  def __init__(self, name: str, rate: fractions.Fraction, options: _Options, flow, gap: int, emit):
    self.name, self.rate, self.options, self.emit = name, rate, options, emit
    self.flow, self.gap = flow, gap
    self.per_clip = max(1, math.floor(options.clip_seconds * rate + 1e-6))
    self.size = self.source_size = self.encoder = self.display = None
    self.scaler = av.video.reformatter.VideoReformatter()   # keeps its context between frames
    self.clips, self.frames, self.notes = 0, 0, []

  def upright(self, frame: av.VideoFrame) -> av.VideoFrame:
    """The frame as players show it: its display matrix (phone video's rotation) applied."""
    orientation = video_lib.display_orientation(frame)
    if orientation == video_lib.UPRIGHT:
      return frame
    self.display = self.display or video_lib.orientation_name(orientation)
    rgb_HxWx3 = video_lib.upright(frame.to_ndarray(format='rgb24'), orientation)
    return av.VideoFrame.from_ndarray(rgb_HxWx3, format='rgb24')

  def add(self, frame: av.VideoFrame):
    frame = self.upright(frame)
    if self.size is None:
      self.source_size = (frame.width, frame.height)
      self.size = _target_size(frame.width, frame.height, self.options.max_side)
      if self.flow is not None and self.flow.shape[1:3] != (frame.height, frame.width):
        self.notes.append(f'flow sidecar grid {self.flow.shape[1:3]} is not the video\'s '
                          f'{(frame.height, frame.width)}; imported without flow')
        self.flow = None
    if self.encoder is None:
      self.encoder = _ClipEncoder(*self.size, self.rate, self.options)
    width, height = self.size
    self.encoder.add(self.scaler.reformat(frame, width=width, height=height, format='yuv420p',
                                          threads=1))
    self.frames += 1
    if self.encoder.frames == self.per_clip:
      self.finish_clip()

  def close(self):
    """Emits the last clip, or drops it when it is a short tail after full clips."""
    tail = min(math.ceil(TAIL_SECONDS * self.rate), self.per_clip // 2)
    if self.encoder is not None and (self.encoder.frames >= tail or self.clips == 0):
      self.finish_clip()
    elif self.encoder is not None:
      self.notes.append(f'dropped the last {self.encoder.frames} frames '
                        f'(a tail under {TAIL_SECONDS} s)')

  def finish_clip(self):
    first, frames = self.clips * self.per_clip, self.encoder.frames
    width, height = self.size
    header = {'source': self.name, 'clip': self.clips, 'start_s': float(first / self.rate),
              'fps': float(self.rate), 'fps_rational': str(self.rate), 'frames': frames,
              'width': width, 'height': height, 'codec': 'h264', 'container': 'mp4',
              'gop': self.options.gop}
    arrays = {}
    if self.flow is not None:
      flow = _clip_flow(self.flow, self.gap, first, frames, self.size)
      if flow is None:
        self.notes.append(f'flow sidecar has {self.flow.shape[0]} pairs, too few for clip '
                          f'{self.clips}; its flow is left out')
      else:
        header['flow_gap_frames'], arrays['flow'] = self.gap, flow
    self.emit(video_lib.encode_record(header, self.encoder.finish(), arrays))
    self.clips, self.encoder = self.clips + 1, None

  def entry(self) -> dict:
    """This video's line in report.json."""
    entry = {'path': self.name, 'clips': self.clips, 'frames': self.frames, 'fps': float(self.rate),
             'width': self.size[0], 'height': self.size[1], 'source_width': self.source_size[0],
             'source_height': self.source_size[1], 'has_flow': self.flow is not None}
    entry = {**entry, 'display': self.display} if self.display else entry
    return {**entry, 'note': '; '.join(self.notes)} if self.notes else entry


def _flushed(stream) -> list[av.VideoFrame]:
  """Frames still inside the decoder after a decoding error (none if it cannot give them)."""
  try:
    return stream.codec_context.decode(None)
  except av.FFmpegError:
    return []


def _video_records(path: pathlib.Path, name: str, options: _Options, emit) -> dict:
  """Decodes one file, calls emit(record) per clip; returns its report entry (raises if unusable).

  A file whose decoding fails part-way keeps the frames decoded before the error
  (the report entry says so in its note).
  """
  flow, gap, note = _load_flow(path)
  with av.open(str(path), mode='r') as container:
    if not container.streams.video:
      raise ValueError('no video stream')
    stream = container.streams.video[0]
    rate = _frame_rate(stream)
    if rate is None:
      raise ValueError('unknown frame rate')
    clipper = _Clipper(name, rate, options, flow, gap, emit)
    clipper.notes += [note] if note else []
    try:
      for packet in container.demux(stream):
        for frame in packet.decode():
          clipper.add(frame)
    except av.FFmpegError as e:
      for frame in _flushed(stream):
        clipper.add(frame)
      if clipper.frames == 0:
        raise
      clipper.notes.append(f'decoding stopped after {clipper.frames} frames ({e.strerror}); '
                           'imported those')
  if clipper.frames == 0:
    raise ValueError('no frames decode')
  if stream.frames and clipper.frames < stream.frames and not clipper.notes:
    clipper.notes.append(f'container lists {stream.frames} frames, {clipper.frames} decoded; '
                         'imported those')
  clipper.close()
  if clipper.flow is not None and clipper.flow.shape[0] != clipper.frames - gap:
    clipper.notes.append(f'flow sidecar has {clipper.flow.shape[0]} pairs; {clipper.frames} '
                         f'frames {gap} apart make {clipper.frames - gap}')
  return clipper.entry()


def _import_file(job: tuple) -> tuple[int, dict | None, str]:
  """Worker: one file → records in its part file; (job id, report entry or None, reason)."""
  i, path, name, part, options = job
  level = av.logging.get_level()
  av.logging.set_level(av.logging.ERROR)   # so that errors carry FFmpeg's own explanation
  with open(part, 'wb') as out, av.logging.Capture():   # captured: not printed
    def emit(record: bytes):
      out.write(struct.pack('<Q', len(record)))
      out.write(record)
    try:
      if os.path.getsize(path) == 0:
        raise ValueError('empty file')
      return i, _video_records(pathlib.Path(path), name, options, emit), ''
    except Exception as e:  # any unusable file is reported, never fatal
      out.seek(0)
      out.truncate()
      return i, None, _reason(e)
    finally:
      av.logging.set_level(level)


def _reason(error: Exception) -> str:
  """One line: what went wrong, with FFmpeg's log message when there is one."""
  message = str(error)
  if isinstance(error, av.FFmpegError):
    message = error.strerror + (f' ({error.log[2].strip()})' if error.log else '')
  return ' '.join(f'{type(error).__name__}: {message}'.split())


def _read_part(part: pathlib.Path):
  """The records of a part file, in order."""
  with open(part, 'rb') as f:
    while size_bytes := f.read(8):
      yield f.read(struct.unpack('<Q', size_bytes)[0])
