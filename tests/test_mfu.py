"""Model FLOPs as the tasks count them, against XLA; and benchmarks/mfu.py end to end on CPU."""

import gzip
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import mfu
from brainscale import config as config_lib
from brainscale import parallel
from brainscale.plan import plan
from brainscale.train import step as step_lib
from conftest import xla_flags

# One layer per stack (XLA's cost analysis counts a loop body once), no remat, dense
# attention, one loss chunk: what XLA compiles is then every FLOP of the step, once.
UNROLLED = ['--config.model.remat=none', '--config.model.attention=xla', '--config.model.layers=1']
FAMILIES = {
    'smoke': ['--config.model.dim=256', '--config.model.heads=4', '--config.model.kv_heads=2',
              '--config.model.head_dim=64', '--config.model.mlp_hidden=1024',
              '--config.data.length=64', '--config.model.vocab=512',
              '--config.model.loss_chunk=100000'],
    'cwm_tiny': ['--config.model.loss_chunk=100000'],
    'enigma_tiny': ['--config.model.global_every=1', '--config.model.video_layers=1',
                    '--config.model.decoder_layers=1'],
}


def _causal_other_half(config, task) -> float:
  """The masked half of causal attention's square term, which dense XLA attention computes."""
  if config.task == 'enigma':  # bidirectional: the task counts the whole square already
    return 0.0
  m, t = config.model, task.tokens_per_example()
  return 6 * m.layers * t * t * m.heads * m.head_dim


def _setup(name):
  """The family's unrolled config on one device (cost analysis is per device)."""
  config = config_lib.resolve(name, UNROLLED + FAMILIES[name])
  return config, step_lib.build(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))


def _compiled_step(name, batch_size):
  config, setup = _setup(name)
  batch = setup.task.synthetic_batch(batch_size, seed=1)
  step = step_lib.make_train_step(setup, batch)
  traced = step.trace(setup.abstract_state, jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch))
  return config, setup, batch, traced, traced.lower().compile()


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_model_flops_match_xla_cost_analysis(name):
  b = 4
  config, setup, _, traced, compiled = _compiled_step(name, b)
  analysis = compiled.cost_analysis()
  xla = (analysis[0] if isinstance(analysis, list) else analysis)['flops']
  model = setup.task.flops_per_example() * b
  expected = model + _causal_other_half(config, setup.task) * b
  # XLA also counts the elementwise work (norms, softmax, AdamW): a few percent here.
  assert 0.99 < xla / expected < 1.05, (name, xla, model, expected)
  # The matmul count of the jaxpr (the benchmark's `compiled` FLOPs) agrees too; it may add
  # the chunked loss's recomputed logits, which XLA merges with the forward's when nothing
  # is rematerialised.
  assert 0.93 < plan.jaxpr_flops(traced.jaxpr.jaxpr) / xla < 1.10, name


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_synthetic_batches_have_the_declared_shapes_and_train(name):
  _, setup = _setup(name)
  shapes = setup.task.batch_shapes(3)
  batch = setup.task.synthetic_batch(3, seed=2)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == {
      k: (s.shape, np.dtype(s.dtype)) for k, s in shapes.items()}
  again = setup.task.synthetic_batch(3, seed=2)
  assert all(np.array_equal(batch[k], again[k]) for k in batch)
  step = step_lib.make_train_step(setup, batch)
  state, metrics = step(step_lib.init_state(setup), step_lib.global_batch(setup, batch))
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  assert int(state['step']) == 1


def test_mfu_benchmark_figures_agree_with_each_other(tmp_path):
  b = 16
  env = dict(os.environ, XLA_FLAGS=xla_flags())   # one CPU device
  done = subprocess.run(
      [sys.executable, 'benchmarks/mfu.py', '--experiment=smoke', '--steps=3', '--repeats=2',
       '--matmul=256', f'--profile={tmp_path}/trace', '--profile_steps=2',
       f'--config.train.batch_size={b}'],
      capture_output=True, text=True, timeout=600, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(done.stdout.splitlines()[-1].removeprefix('RESULT '))
  config = config_lib.resolve('smoke', [f'--config.train.batch_size={b}'])
  task = step_lib.get_task(config)
  assert r['model_flops_per_step'] == pytest.approx(task.flops_per_example() * b)
  assert r['tokens_per_s'] == pytest.approx(b * task.tokens_per_example() / r['step_s'])
  assert r['mfu'] == pytest.approx(r['model_flops_per_step'] / r['step_s'] / r['peak_tflops']
                                   / 1e12)
  assert r['peak_tflops'] == r['matmul_tflops']   # on CPU the peak is the measured ceiling
  # remat='full' recomputes the forward: about 4/3 of the model's matmuls, plus the loss's.
  assert 1.25 < r['compiled_flops_per_step'] / r['model_flops_per_step'] < 1.6
  assert np.isfinite(r['loss'])
  kinds = r['profile']['kinds_ms']
  assert kinds.get('matmul', 0) > 0, kinds
  assert 'control' not in kinds
  # Busy time is the device ops of the traced steps; threads may overlap, so allow 2x.
  assert 0 < r['profile']['busy_ms'] < 2 * 1e3 * r['step_s'] * 3
  assert 'mfu: ' in done.stdout and 'profile: ' in done.stdout


def test_trace_op_times_reads_only_the_xla_ops_line_of_a_gpu_trace(tmp_path):
  meta = lambda kind, pid, tid, name: {'ph': 'M', 'name': kind, 'pid': pid, 'tid': tid,
                                       'args': {'name': name}}
  op = lambda pid, tid, name, dur, **args: {'ph': 'X', 'pid': pid, 'tid': tid, 'name': name,
                                            'ts': 0, 'dur': dur, 'args': args}
  events = [meta('process_name', 1, 0, '/device:GPU:0'), meta('process_name', 2, 0, '/host:CPU'),
            meta('thread_name', 1, 7, 'Stream #20(Compute)'), meta('thread_name', 1, 8, 'XLA Ops'),
            op(1, 7, 'sm90_xmma_gemm_bf16', 300, hlo_op='gemm_fusion.3'),
            op(1, 7, 'loop_exp_kernel', 50, hlo_op='loop_exp_fusion'),
            op(1, 8, 'gemm_fusion.3', 310), op(1, 8, 'loop_exp_fusion', 55),
            op(1, 8, 'gemm_fusion.3', 290), op(2, 3, 'gemm_fusion.3', 9999)]
  path = tmp_path / 'plugins/profile/run/host.perfetto_trace.json.gz'
  path.parent.mkdir(parents=True)
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  times = mfu.trace_op_times(str(tmp_path))
  assert times == pytest.approx({'gemm_fusion.3': 600e-6, 'loop_exp_fusion': 55e-6})
