"""CWM's data: imported video shards, and the synthetic physics videos made on first use.

`config.data.directory` names an imported folder (see
brainscale/data/importers/videos.py); empty means the embedded default, the
synthetic clips of `config.data.synthetic`, rendered and imported once into
$BRAINSCALE_DATA (default ~/.cache/brainscale) under a name that hashes their
spec and the code that makes them, so every experiment that asks for the same clips
shares them.
"""

import dataclasses

from brainscale.data import cache, video
from brainscale.data.importers import videos as importer
from brainscale.data.synthetic import physics, physics_files


def synthetic_shards(s, workers: int = 1) -> str:
  """The imported shards of synthetic section `s` (count, seed, spec), made on first use."""
  spec = cache.spec_of(s, physics.Spec)
  root = cache.named('cwm_synthetic', {'spec': dataclasses.asdict(spec), 'count': s.count,
                                       'seed': s.seed}, (physics, physics_files, importer, video))

  def make():
    print(f'brainscale: rendering {s.count} synthetic clips into {root} (once)', flush=True)
    physics_files.generate(root / 'videos', count=s.count, seed=s.seed, spec=spec, workers=workers)
    report = importer.import_videos(root / 'videos', root / 'shards', max_side=0,
                                    workers=workers,
                                    clip_seconds=max(60.0, spec.frames / spec.fps + 1),
                                    progress=False)
    if report.skipped:
      raise RuntimeError(f'synthetic clips failed to import: {report.summary()}')

  return str(cache.make_once(root, 'shards/index.json', make) / 'shards')


def train_directory(c) -> str:
  return c.data.directory or synthetic_shards(c.data.synthetic, max(c.data.workers, 1))


def eval_directory(c) -> str:
  return c.data.eval_directory or synthetic_shards(c.data.eval_synthetic, max(c.data.workers, 1))


def pipeline(c, directory: str, *, frames: int, train: bool, seed: int, batch_size: int,
             process_index: int, process_count: int, with_flow: bool = False):
  """The Grain pipeline of config `c` over `directory`."""
  return video.pipeline(
      directory, seed=seed, batch_size=batch_size, process_index=process_index,
      process_count=process_count, size=c.data.size, frames=frames, gap_ms=c.data.gap_ms,
      train=train, workers=c.data.workers if train else 0, prefetch=c.data.prefetch,
      scale=tuple(c.data.scale), with_flow=with_flow)
