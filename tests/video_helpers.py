"""Shared by tests/test_video_import.py and tests/test_video_pipeline.py: videos written with
PyAV, where frame i of most is a flat gray level 16 + 4 i, so a decoded frame tells its index
whatever the resize and crop; and the folder of valid and broken videos both modules import.
"""

import fractions

import av
import numpy as np

from brainscale.data.importers import videos as importer

# name: (codec, width, height, fps, frames); imported with clip_seconds=1, max_side=32
VIDEOS = {
    'a.mp4': ('libx264', 64, 48, 30, 60),      # 2 clips of 30
    'b.webm': ('libvpx-vp9', 48, 64, 24, 36),  # 24 + a 12-frame (0.5 s) tail: 2 clips
    'sub/c.mkv': ('mpeg4', 96, 64, 10, 32),    # 3 clips of 10; the 2-frame tail is dropped
    'd.avi': ('mpeg4', 64, 48, 25, 25),        # 1 clip
    'e.mov': ('libx264', 64, 48, 20, 16),      # 1 clip shorter than clip_seconds
    'noise.mp4': ('libx264', 64, 48, fractions.Fraction(30000, 1001), 29),  # random pixels, 1 clip
}
CLIPS = {'a.mp4': 2, 'b.webm': 2, 'sub/c.mkv': 3, 'd.avi': 1, 'e.mov': 1, 'noise.mp4': 1}


def gray(i: int, width: int, height: int, step: int = 4) -> np.ndarray:
  return np.full((height, width, 3), 16 + step * i, np.uint8)


def index_of(frames_NxHxWx3: np.ndarray, step: int = 4) -> np.ndarray:
  """The frame numbers of gray-level frames."""
  return np.round((frames_NxHxWx3.reshape(len(frames_NxHxWx3), -1).mean(1) - 16) / step).astype(int)


def write_video(path, codec, width, height, fps, count, *, draw=gray, options=None):
  """Writes `count` frames draw(i, width, height) with PyAV."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), 'w', options=options or {}) as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    stream.bit_rate = 4_000_000
    for i in range(count):
      frame = av.VideoFrame.from_ndarray(draw(i, width, height), format='rgb24')
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
  return path


def noise(seed):
  rng = np.random.default_rng(seed)
  return lambda i, width, height: rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def import_quietly(source, out, **kwargs):
  return importer.import_videos(source, out, progress=False, **kwargs)


def write_sources(root):
  """Writes VIDEOS (valid, of several containers and codecs) and broken files into root."""
  for name, spec in VIDEOS.items():
    write_video(root / name, *spec, draw=noise(0) if name == 'noise.mp4' else gray)
  data = write_video(root / 'cut.mp4', 'libx264', 64, 48, 30, 60).read_bytes()
  (root / 'cut.mp4').write_bytes(data[:len(data) // 2])   # index (moov) at the end: unreadable
  data = write_video(root / 'cutfast.mp4', 'libx264', 64, 48, 30, 60, draw=noise(1),
                     options={'movflags': 'faststart'}).read_bytes()
  (root / 'cutfast.mp4').write_bytes(data[:len(data) // 2])   # index first: half decodes
  (root / 'text.mp4').write_text('not a video\n')
  (root / 'empty.avi').write_bytes(b'')
  (root / 'random.webm').write_bytes(np.random.default_rng(2).bytes(4000))
  (root / 'notes.txt').write_text('not a video suffix: ignored\n')
  return root


def import_sources(sources, out):
  """write_sources' folder imported with clip_seconds=1, max_side=32: (out, the report)."""
  report = import_quietly(sources, out, clip_seconds=1.0, max_side=32, records_per_shard=4)
  return out, report
