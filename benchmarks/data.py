# python benchmarks/data.py [--experiment=cwm_1b|enigma_1b] [--examples=256] [--workers=0,2]
"""Input pipeline throughput per worker against what one GPU consumes at 45% MFU.

Video (a CWM experiment): renders `--clips` synthetic physics clips at a short
side a bit above the training size (as real video imported with max_side=320
would be), imports them, and times the Grain pipeline (PyAV decode of two
frames `gap_ms` apart, random resize and crop, batching).
Neural (an Enigma experiment): simulates a V1 store with `--neurons` per
session and times windows (tensorstore reads of every modality, a random
neuron subset up to data.max_neurons, normalisation, batching).
workers=0 runs in this process: that is the per-worker rate. The appetite is
0.45 x peak / (model FLOPs of one example); appetite / rate is how many
workers one GPU needs.
"""

import pathlib
import tempfile
import time

from absl import app, flags, logging

from brainscale import config as config_lib
from brainscale.data import neural, video
from brainscale.data.importers import videos as importer
from brainscale.data.synthetic import physics, physics_files, v1, v1_files
from brainscale.train.task import get_task

flags.DEFINE_integer('size', 256, 'training resolution (square crops)')
flags.DEFINE_integer('clips', 32, 'synthetic clips to render and import')
flags.DEFINE_integer('examples', 256, 'frame pairs timed per measurement (after warm-up)')
flags.DEFINE_list('workers', ['0', '2'], 'Grain worker processes to measure (0 = in process)')
flags.DEFINE_float('mfu', 0.45, 'model FLOPs utilisation assumed for the appetite')
flags.DEFINE_string('experiment', 'cwm_1b', 'whose appetite (examples per GPU per second)')
flags.DEFINE_string('data', '', 'an imported folder / neural store instead of synthetic data')
flags.DEFINE_integer('neurons', 1024, 'neurons per simulated session (neural benchmark)')
FLAGS = flags.FLAGS


def dataset(tmp: pathlib.Path) -> str:
  spec = physics.Spec(size=round(FLAGS.size * 1.25 / 2) * 2, frames=24, fps=24.0)
  start = time.perf_counter()
  physics_files.generate(tmp / 'videos', count=FLAGS.clips, seed=0, spec=spec, workers=2)
  importer.import_videos(tmp / 'videos', tmp / 'shards', max_side=0, progress=False, workers=2)
  print(f'rendered and imported {FLAGS.clips} clips of {spec.size}x{spec.size} in '
        f'{time.perf_counter() - start:.1f}s')
  return str(tmp / 'shards')


def neural_store(tmp: pathlib.Path) -> str:
  spec = v1.Spec(animals=1, sessions_per_animal=2, neurons=FLAGS.neurons, train_trials=12)
  start = time.perf_counter()
  v1_files.generate(tmp / 'store', spec)
  print(f'simulated 2 sessions x {FLAGS.neurons} neurons in {time.perf_counter() - start:.1f}s')
  return str(tmp / 'store')


def video_pipeline(directory: str, workers: int, config, batch: int):
  return video.pipeline(directory, seed=0, batch_size=batch, process_index=0, process_count=1,
                        size=FLAGS.size, frames=2, gap_ms=config.data.gap_ms, train=True,
                        workers=workers, prefetch=4, scale=tuple(config.data.scale))


def neural_pipeline(root: str, workers: int, config, batch: int):
  d = config.data
  return neural.pipeline(root, seed=0, batch_size=batch, process_index=0, process_count=1,
                         window=d.window, stride=d.stride, tiers=('train',),
                         max_neurons=d.max_neurons, min_neurons=d.min_neurons, train=True,
                         workers=workers, prefetch=4)


def examples_per_s(pipeline, workers: int) -> float:
  batch = 8
  it = iter(pipeline(workers, batch))
  for _ in range(max(2, workers * 2)):   # warm-up: worker start, first reads
    next(it)
  start = time.perf_counter()
  for _ in range(FLAGS.examples // batch):
    next(it)
  return FLAGS.examples // batch * batch / (time.perf_counter() - start)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = config_lib.resolve(FLAGS.experiment, [])
  task = get_task(config)
  flops = task.flops_per_example()
  appetite = FLAGS.mfu * config.train.peak_tflops * 1e12 / flops
  neural = config.task.startswith('enigma')
  unit = 'windows' if neural else 'pairs'
  print(f'{FLAGS.experiment}: {flops:.3g} model FLOPs per example ({unit[:-1]}); at '
        f'{FLAGS.mfu:.0%} MFU of {config.train.peak_tflops:g} TFLOP/s one GPU consumes '
        f'{appetite:.2f} {unit}/s')
  with tempfile.TemporaryDirectory() as tmp:
    make, pipeline = (neural_store, neural_pipeline) if neural else (dataset, video_pipeline)
    directory = FLAGS.data or make(pathlib.Path(tmp))
    for workers in map(int, FLAGS.workers):
      rate = examples_per_s(lambda w, b: pipeline(directory, w, config, b), workers)
      per_worker = rate / max(workers, 1)
      print(f'workers={workers}: {rate:.1f} {unit}/s ({per_worker:.1f} per worker) = '
            f'{per_worker / appetite:.1f}x one GPU\'s appetite per worker; '
            f'{appetite / per_worker:.2f} workers per GPU needed')


if __name__ == '__main__':
  app.run(main)
