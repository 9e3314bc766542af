# python benchmarks/loop.py [--experiment=smoke] [--steps=200] [--repeats=3] \
#     [--config.KEY=VALUE ...]
"""Loop efficiency: steps/s of the full training loop over steps/s of the bare step.

The full loop is loop.train as launch/run.py runs it (Grain data, host transfer,
metrics read back every step, log lines, TensorBoard, a checkpoint every
`--checkpoint_every` steps); the bare step is the same jitted step on one batch
already on the device. Both run in this process, alternating `--repeats`
times, and the ratio of each pair is printed; the median is the figure.
Compile time is excluded from both.
"""

import json
import statistics
import sys
import tempfile
import time

import jax
from absl import app, flags, logging

from brainscale import config as config_lib
from brainscale.train import loop, report
from brainscale.train import step as step_lib

flags.DEFINE_string('experiment', 'smoke', 'experiment to measure')
flags.DEFINE_integer('steps', 200, 'timed steps per measurement')
flags.DEFINE_integer('repeats', 3, 'alternating (bare, loop) pairs')
flags.DEFINE_integer('checkpoint_every', 100, 'checkpoint period inside the timed loop')
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []

# A model big enough that a CPU step is tens of milliseconds, as a GPU step is.
DEFAULTS = ['--config.model.dim=256', '--config.model.layers=4', '--config.model.heads=8',
            '--config.model.kv_heads=8', '--config.model.head_dim=32',
            '--config.model.mlp_hidden=768', '--config.data.length=32',
            '--config.model.compute_dtype=float32']  # bf16 matmuls are emulated on CPU


def bare_steps_per_s(config) -> float:
  setup = step_lib.build(config)
  state = step_lib.init_state(setup)
  local = next(setup.task.train_data(jax.process_index(), jax.process_count()))
  batch = step_lib.global_batch(setup, local)
  step = step_lib.make_train_step(setup, local)
  for _ in range(3):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return FLAGS.steps / (time.perf_counter() - start)


def loop_steps_per_s(config) -> float:
  """Steps/s of loop.train over its timed interval (steps after the first log line)."""
  warmup = 10
  with tempfile.TemporaryDirectory() as workdir:
    config.train.steps = warmup + FLAGS.steps
    config.train.log_every = warmup
    config.checkpoint.every_steps = FLAGS.checkpoint_every
    config.train.eval_batches = 1
    loop.train(config, workdir)
    rows = report.read_jsonl(f'{workdir}/metrics.jsonl')
  timed = [(s, r['perf/steps_per_s']) for s, r in sorted(rows.items())
           if 'perf/steps_per_s' in r and s > warmup]
  seconds = sum(warmup / rate for _, rate in timed)  # each interval is `warmup` steps
  return FLAGS.steps / seconds


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  ratios = []
  for i in range(FLAGS.repeats):
    bare = bare_steps_per_s(config_lib.resolve(FLAGS.experiment, DEFAULTS + _OVERRIDES))
    full = loop_steps_per_s(config_lib.resolve(FLAGS.experiment, DEFAULTS + _OVERRIDES))
    ratios.append(full / bare)
    print(json.dumps({'repeat': i, 'bare_steps_per_s': round(bare, 2),
                      'loop_steps_per_s': round(full, 2), 'ratio': round(full / bare, 4)}),
          flush=True)
  print(f'jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s), '
        f'{FLAGS.steps} steps, checkpoint every {FLAGS.checkpoint_every}')
  print(f'loop_efficiency: {statistics.median(ratios):.4f}  (median of {FLAGS.repeats}; '
        f'target >= 0.97)')


if __name__ == '__main__':
  _OVERRIDES[:], rest = config_lib.split_overrides(sys.argv)
  app.run(main, argv=rest)
