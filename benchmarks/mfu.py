# python benchmarks/mfu.py --experiment=cwm_1b_1gpu [--steps=20] [--profile=DIR] \
#     [--config.KEY=VALUE ...]
"""Model FLOPs utilisation of an experiment's train step on this machine's devices.

The step is the one launch/run.py trains with (train/step.py:make_train_step), compiled
ahead of time for a synthetic batch from the task (`Task.synthetic_batch`)
that is put on the devices once, so nothing but the step is timed: `--steps`
steps are dispatched back to back and waited for, `--repeats` times, and the
median is the step time. It prints step time, tokens/s, model TFLOP/s per
device and MFU (model FLOPs as the task counts them, causal attention as half
the square term; peak 989 TFLOP/s bf16 on H100/H200 SXM), and the same against
the bare matmul ceiling measured in this run: a large matmul in the compute
dtype. `compiled` FLOPs are the step's matmuls as compiled (remat recomputation
and the chunked loss's recomputed logits included): compiled / model is the
ceiling remat puts on MFU.

`--profile=DIR` traces `--profile_steps` more steps with jax.profiler (open
DIR in TensorBoard or Perfetto) and prints where the device time went, by
kind of HLO op (matmuls, attention kernels, other fusions, collectives,
copies) and the ten largest ops, read from the trace against the compiled HLO.

On a GPU it sets the XLA flags of cluster jobs (brainscale/plan/gpu.py:XLA_FLAGS)
(`--nogpu_flags` to measure without them), XLA_PYTHON_CLIENT_MEM_FRACTION
and CUDA_DEVICE_MAX_CONNECTIONS.
The last line is `RESULT {json}`, for scripts.
"""

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from brainscale import config as config_lib
from brainscale.plan import collectives, gpu, hlo, plan
from brainscale.train import report as train_report
from brainscale.train import step as step_lib
from brainscale.train.profile import profile_summary, trace_op_times  # noqa: F401

flags.DEFINE_string('experiment', 'smoke', 'experiment whose train step is measured')
flags.DEFINE_integer('steps', 20, 'steps dispatched back to back per measurement')
flags.DEFINE_integer('repeats', 3, 'measurements; the median is reported')
flags.DEFINE_integer('warmup', 2, 'steps run before timing')
flags.DEFINE_integer('matmul', 8192, 'side of the square matmul whose rate is the ceiling')
flags.DEFINE_float('peak_tflops', 0, 'peak per device; 0: config.train.peak_tflops on an '
                   'accelerator, the measured matmul ceiling on CPU')
flags.DEFINE_string('profile', '', 'write a jax.profiler trace here and summarise it')
flags.DEFINE_integer('profile_steps', 3, 'steps traced with --profile')
flags.DEFINE_bool('gpu_flags', True, "add brainscale.plan.gpu.XLA_FLAGS to XLA_FLAGS")
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []
GiB = 2 ** 30


def set_gpu_environment():
  """The cluster jobs' XLA flags and memory fraction (read when JAX starts its backend)."""
  present = os.environ.get('XLA_FLAGS', '')
  missing = [f for f in gpu.XLA_FLAGS if f.split('=')[0] not in present]
  os.environ['XLA_FLAGS'] = ' '.join([present] + missing).strip()
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.90')
  os.environ.setdefault('CUDA_DEVICE_MAX_CONNECTIONS', '1')


def compile_step(config):
  """(setup, state, batch on the devices, compiled step, traced step, compile seconds)."""
  if jax.process_count() != 1:
    raise SystemExit('brainscale: benchmarks/mfu.py measures one host; run it without srun')
  setup = step_lib.build(config)
  state = step_lib.init_state(setup)
  batch = step_lib.global_batch(setup, setup.task.synthetic_batch(config.train.batch_size))
  step = step_lib.make_train_step(setup, batch)
  start = time.perf_counter()
  traced = step.trace(state, batch)
  compiled = traced.lower().compile()
  return setup, state, batch, compiled, traced, time.perf_counter() - start


def seconds_per_step(compiled, state, batch, *, steps: int, repeats: int, warmup: int):
  """Median over `repeats` of (wall time of `steps` back-to-back steps) / steps; final state."""
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) / steps)
  return statistics.median(times), state, metrics


# ------------------------------------------------------------------ profile
# trace_op_times and profile_summary: brainscale/train/profile.py (the trainer profiles too)


def profile(compiled, state, batch, directory: str, steps: int) -> dict:
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  return profile_summary(directory, compiled.as_text(), steps)


# --------------------------------------------------------------------- main
def predicted(config, compiled, mesh) -> dict:
  """plan mode's estimate of this very executable: its kernels at their roofline and its
  collectives at the cluster's link bandwidths (brainscale/plan/hlo.py), on a GPU it knows."""
  device = jax.devices()[0]
  spec = next((g for g in gpu.GPUS.values() if g.description == device.device_kind), None)
  if device.platform != 'gpu' or spec is None:
    return {}
  analysis = hlo.analyze(compiled.as_text(), collectives.Layout.of_mesh(mesh))
  links = config.get('cluster', {})
  collective_s = analysis.collective_seconds(links.get('nvlink_gbps', 450.0) * 1e9,
                                             links.get('infiniband_gbps', 50.0) * 1e9)
  compute_s = analysis.compute_seconds(spec)
  return {'predicted_compute_s': compute_s, 'predicted_collective_s': collective_s,
          'predicted_step_s': [max(compute_s, collective_s), compute_s + collective_s],
          'hlo_flops_per_step': analysis.flops() * jax.device_count(), 'predicted_gpu': spec.name}


def measure(config) -> dict:
  """Everything the benchmark prints, as one flat record."""
  setup, state, batch, compiled, traced, compile_s = compile_step(config)
  step_s, state, metrics = seconds_per_step(compiled, state, batch, steps=FLAGS.steps,
                                            repeats=FLAGS.repeats, warmup=FLAGS.warmup)
  devices = jax.devices()
  dtype = jnp.dtype(config.model.compute_dtype)
  ceiling = train_report.matmul_flops(FLAGS.matmul, dtype.name)
  on_cpu = devices[0].platform == 'cpu'
  peak = FLAGS.peak_tflops * 1e12 or (ceiling if on_cpu else
                                      train_report.peak_flops_per_device(config))
  task, b = setup.task, config.train.batch_size
  model_flops = task.flops_per_example() * b
  per_device = model_flops / step_s / len(devices)
  memory = compiled.memory_analysis()
  stats = devices[0].memory_stats() or {}
  record = {
      'experiment': config.experiment, 'devices': len(devices),
      'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
      'jax': jax.__version__, 'batch_size': b, 'tokens_per_example': task.tokens_per_example(),
      'attention': config.model.get('attention', 'xla'), 'remat': config.model.get('remat', ''),
      'compile_s': round(compile_s, 1), 'step_s': step_s,
      'tokens_per_s': b * task.tokens_per_example() / step_s,
      'examples_per_s': b / step_s,
      'model_flops_per_step': model_flops,
      'compiled_flops_per_step': plan.jaxpr_flops(traced.jaxpr.jaxpr),
      'model_tflops_per_device': per_device / 1e12,
      'peak_tflops': peak / 1e12, 'mfu': per_device / peak,
      'matmul_tflops': ceiling / 1e12, 'matmul_n': FLAGS.matmul, 'matmul_dtype': dtype.name,
      'mfu_of_matmul_ceiling': per_device / ceiling,
      'argument_gib': memory.argument_size_in_bytes / GiB,
      'temp_gib': memory.temp_size_in_bytes / GiB,
      'peak_gib_in_use': stats.get('peak_bytes_in_use', 0) / GiB,
      'loss': float(metrics.get('loss', float('nan'))),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  record.update(predicted(config, compiled, setup.mesh))
  if FLAGS.profile:
    record['profile'] = profile(compiled, state, batch, FLAGS.profile, FLAGS.profile_steps)
  return record


def report(r: dict) -> str:
  compiled_over_model = r['compiled_flops_per_step'] / r['model_flops_per_step']
  lines = [
      f"{r['experiment']} on {r['devices']} x {r['device_kind']} ({r['platform']}), "
      f"jax {r['jax']}; attention {r['attention']}, remat {r['remat']}",
      f"batch {r['batch_size']} x {r['tokens_per_example']} tokens; compile {r['compile_s']} s; "
      f"XLA memory per device: arguments {r['argument_gib']:.2f} GiB, temporaries "
      f"{r['temp_gib']:.2f} GiB; peak in use {r['peak_gib_in_use']:.2f} GiB",
      f"step_s: {r['step_s']:.4f}",
      f"tokens_per_s: {r['tokens_per_s']:.4g}  ({r['examples_per_s']:.3g} examples/s)",
      f"model_tflops_per_device: {r['model_tflops_per_device']:.4g}",
      f"mfu: {r['mfu']:.4f}  (of {r['peak_tflops']:.4g} TFLOP/s peak)",
      f"matmul_ceiling_tflops: {r['matmul_tflops']:.4g}  ({r['matmul_dtype']} "
      f"{r['matmul_n']}^3; {r['matmul_tflops'] / r['peak_tflops']:.2%} of peak)",
      f"mfu_of_matmul_ceiling: {r['mfu_of_matmul_ceiling']:.4f}",
      f"compiled/model flops: {compiled_over_model:.3f}  "
      f"(hardware FLOPs utilisation {r['mfu'] * compiled_over_model:.4f})",
  ]
  if 'predicted_step_s' in r:
    fast, slow = r['predicted_step_s']
    lines.append(f"predicted_step_s: {fast:.4f} .. {slow:.4f}  (plan's roofline estimate on "
                 f"{r['predicted_gpu']}: collectives hidden .. not); measured / predicted: "
                 f"{r['step_s'] / fast:.2f} .. {r['step_s'] / slow:.2f}")
    lines.append(f"hlo_flops_per_step: {r['hlo_flops_per_step']:.4g}  (read from the compiled "
                 f"HLO; jaxpr count {r['compiled_flops_per_step']:.4g})")
  if 'profile' in r:
    p = r['profile']
    lines.append(f"profile: {p['busy_ms']:.3f} ms busy per step of {1e3 * r['step_s']:.3f} ms")
    lines += [f'  {kind:<34s} {t:10.3f} ms' for kind, t in p['kinds_ms'].items()]
    lines += [f'    {op:<40s} {kind:<34s} {t:10.3f} ms' for op, kind, t in p['top_ops_ms']]
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.gpu_flags:
    set_gpu_environment()
  config = config_lib.resolve(FLAGS.experiment, _OVERRIDES)
  record = measure(config)
  print(report(record))
  print('RESULT ' + json.dumps(record), flush=True)


if __name__ == '__main__':
  _OVERRIDES[:], rest = config_lib.split_overrides(sys.argv)
  app.run(main, argv=rest)
