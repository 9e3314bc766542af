"""Physics clips on disk: per clip an mp4, its float16 flow and metadata; datasets written once.

generate writes clip_NNNNNN.mp4, .flow.npy and .json per clip and a spec.json into a
directory that appears whole (a temporary sibling, renamed); clip i is rendered from
clip_seed(seed, i), so the bytes do not depend on the number of workers.
Shape key: T frames, H, W height and width in pixels.
"""

import dataclasses
import fractions
import json
import multiprocessing
import os
import pathlib
import shutil
import uuid

import av
import numpy as np

from brainscale.data.synthetic import physics


def write_video(path, frames_TxHxWx3, fps, *, codec='libx264', crf=16) -> None:
  """Encodes uint8 RGB frames as yuv420p video; the container follows the suffix (.mp4, .mkv)."""
  frames = np.asarray(frames_TxHxWx3)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'frames are {frames.dtype} {frames.shape}; need uint8 [T, H, W, 3]')
  height, width = frames.shape[1:3]
  if height % 2 or width % 2:
    raise ValueError(f'yuv420p needs even frame sides, got {width}x{height}')
  rate = fractions.Fraction(fps).limit_denominator(1001)
  with av.open(str(path), mode='w') as container:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    stream.options = {'crf': str(crf)}
    if codec == 'libx264':   # the same bytes on any machine, in any process: one thread, and
      # no mb-tree (with it, x264 asm output on small frames varies with the heap contents)
      stream.options |= {'x264-params': 'threads=1:lookahead-threads=1:mbtree=0'}
    for t, frame_HxWx3 in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(frame_HxWx3, format='rgb24')
      frame.pts = t
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


def clip_seed(seed: int, index: int) -> int:
  """The render seed of clip `index` of a dataset with `seed`."""
  return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def _write_clip(job) -> None:
  """Renders clip i and writes its video, float16 flow and metadata into `folder`."""
  folder, index, seed, spec = job
  clip = physics.render(seed, spec)
  stem = folder / f'clip_{index:06d}'
  write_video(f'{stem}.mp4', clip.frames_TxHxWx3, spec.fps)
  np.save(f'{stem}.flow.npy', clip.flow_TxHxWx2.astype(np.float16), allow_pickle=False)
  meta = {'flow_gap_frames': spec.flow_gap, 'fps': spec.fps, 'seed': seed, 'size': spec.size,
          'frames': spec.frames}
  pathlib.Path(f'{stem}.json').write_text(json.dumps(meta))


def _differences(found, manifest: dict) -> str:
  """How a directory's spec.json differs from the manifest wanted, in a few words."""
  if not isinstance(found, dict):
    return 'no readable spec.json'
  flat = lambda m: {'count': m.get('count'), 'seed': m.get('seed'),
                    **{f'spec.{k}': v for k, v in dict(m.get('spec') or {}).items()}}
  there, here = flat(found), flat(manifest)
  return ', '.join(f'{key}={there.get(key)} there, {here.get(key)} asked'
                   for key in sorted(there.keys() | here.keys()) if there.get(key) != here.get(key))


def _is_complete(directory: pathlib.Path, manifest: dict, paths) -> bool:
  """False where there is no dataset yet; True where it is this one; else a ValueError."""
  if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
    return False
  try:
    found = json.loads((directory / 'spec.json').read_text())
  except (OSError, ValueError):
    found = None
  if found != manifest:
    raise ValueError(f'{directory} holds another dataset ({_differences(found, manifest)}); '
                     'delete it or choose another directory')
  missing = [p.name for p in paths if not p.is_file()]
  if missing:
    raise ValueError(f'{directory} lacks {missing[0]} and {len(missing) - 1} other clips; '
                     'delete it or choose another directory')
  return True


def generate(directory, *, count: int, seed: int, spec: physics.Spec,
             workers: int = 1) -> list[pathlib.Path]:
  """Writes `count` clips into `directory` once, atomically; returns their mp4 paths.

  Clips are rendered into a temporary sibling that is renamed when all are written,
  so a directory that exists is complete. Clip i has seed clip_seed(seed, i),
  whatever `workers` (a spawn pool).
  """
  directory = pathlib.Path(directory)
  manifest = json.loads(json.dumps({'spec': dataclasses.asdict(spec), 'count': count,
                                    'seed': seed}))
  paths = [directory / f'clip_{i:06d}.mp4' for i in range(count)]
  if _is_complete(directory, manifest, paths):
    return paths
  directory.parent.mkdir(parents=True, exist_ok=True)
  partial = directory.parent / f'.{directory.name}.partial-{uuid.uuid4().hex[:12]}'
  partial.mkdir()
  try:
    jobs = [(partial, i, clip_seed(seed, i), spec) for i in range(count)]
    if workers > 1:
      with multiprocessing.get_context('spawn').Pool(workers) as pool:
        pool.map(_write_clip, jobs, chunksize=1)
    else:
      for job in jobs:
        _write_clip(job)
    (partial / 'spec.json').write_text(json.dumps(manifest, indent=1))
    try:
      os.rename(partial, directory)
    except OSError:   # another process finished the same dataset first
      if not _is_complete(directory, manifest, paths):
        raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return paths
