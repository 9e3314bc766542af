# python benchmarks/data.py [--size=256] [--clips=32] [--examples=256] [--workers=0,2]
"""Video pipeline throughput: decoded frame pairs per second per worker, against the GPU's appetite.

Renders `--clips` synthetic physics clips at a short side a bit above the
training size (as real video imported with max_side=320 would be), imports
them, and times the Grain pipeline of the CWM experiments (PyAV decode of two
frames `gap_ms` apart, random resize and crop, batching). workers=0 decodes in
this process: that is the per-worker rate. The appetite is what `cwm_1b`
consumes per GPU at 45% MFU: 0.45 x peak / (model FLOPs of one example).
The ratio of the two is how many decode workers one GPU needs.
"""

import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_integer('size', 256, 'training resolution (square crops)')
flags.DEFINE_integer('clips', 32, 'synthetic clips to render and import')
flags.DEFINE_integer('examples', 256, 'frame pairs timed per measurement (after warm-up)')
flags.DEFINE_list('workers', ['0', '2'], 'Grain worker processes to measure (0 = in process)')
flags.DEFINE_float('mfu', 0.45, 'model FLOPs utilisation assumed for the appetite')
flags.DEFINE_string('experiment', 'cwm_1b', 'whose appetite (examples per GPU per second)')
flags.DEFINE_string('data', '', 'an imported video folder to use instead of synthetic clips')
FLAGS = flags.FLAGS


def dataset(tmp: pathlib.Path) -> str:
  from brainscale.data.importers import videos as importer  # noqa: PLC0415
  from brainscale.data.synthetic import physics  # noqa: PLC0415
  spec = physics.Spec(size=round(FLAGS.size * 1.25 / 2) * 2, frames=24, fps=24.0)
  start = time.perf_counter()
  physics.generate(tmp / 'videos', count=FLAGS.clips, seed=0, spec=spec, workers=2)
  importer.import_videos(tmp / 'videos', tmp / 'shards', max_side=0, progress=False, workers=2)
  print(f'rendered and imported {FLAGS.clips} clips of {spec.size}x{spec.size} in '
        f'{time.perf_counter() - start:.1f}s')
  return str(tmp / 'shards')


def pairs_per_s(directory: str, workers: int, config) -> float:
  from brainscale.data import video  # noqa: PLC0415
  batch = 8
  it = iter(video.pipeline(directory, seed=0, batch_size=batch, process_index=0,
                           process_count=1, size=FLAGS.size, frames=2,
                           gap_ms=config.data.gap_ms, train=True, workers=workers,
                           prefetch=4, scale=tuple(config.data.scale)))
  for _ in range(max(2, workers * 2)):   # warm-up: worker start, first decodes
    next(it)
  start = time.perf_counter()
  for _ in range(FLAGS.examples // batch):
    b = next(it)
  elapsed = time.perf_counter() - start
  assert b['frames'].shape == (batch, 2, FLAGS.size, FLAGS.size, 3)
  return FLAGS.examples // batch * batch / elapsed


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from brainscale import config as config_lib  # noqa: PLC0415
  from brainscale.train.task import get_task  # noqa: PLC0415
  config = config_lib.resolve(FLAGS.experiment, [])
  task = get_task(config)
  flops = task.flops_per_example()
  appetite = FLAGS.mfu * config.train.peak_tflops * 1e12 / flops
  print(f'{FLAGS.experiment}: {flops:.3g} model FLOPs per frame pair; at {FLAGS.mfu:.0%} MFU of '
        f'{config.train.peak_tflops:g} TFLOP/s one GPU consumes {appetite:.2f} pairs/s')
  with tempfile.TemporaryDirectory() as tmp:
    directory = FLAGS.data or dataset(pathlib.Path(tmp))
    for workers in map(int, FLAGS.workers):
      rate = pairs_per_s(directory, workers, config)
      per_worker = rate / max(workers, 1)
      print(f'workers={workers}: {rate:.1f} pairs/s ({per_worker:.1f} per worker) = '
            f'{per_worker / appetite:.1f}x one GPU\'s appetite per worker; '
            f'{appetite / per_worker:.2f} workers per GPU needed')


if __name__ == '__main__':
  app.run(main)
