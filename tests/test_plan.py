"""--mode=plan on simulated CPU devices (plan.target=cpu), and how the target is chosen.

Plans compiled for the GPUs themselves are in tests/test_gpu_compile.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainscale import config as config_lib
from brainscale.plan import gpu, plan
from test_train import run_cli


def _value(name: str, text: str) -> float:
  return float(re.search(rf'^{name}: ([\d.e+]+)', text, re.M).group(1))


@pytest.mark.slow
@pytest.mark.parametrize('experiment,devices', [('cwm_1b', 8), ('cwm_1b_1gpu', 1)])
def test_cluster_experiments_fit(experiment, devices):
  result = run_cli(f'--experiment={experiment}', '--mode=plan', '--config.plan.target=cpu',
                   timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert f'= {devices} devices' in out
  assert f'compiled_for: {devices} simulated CPU devices' in out
  assert "within -2..+7 GiB of XLA GPU's" in out and '`make cuda`' in out
  assert _value('per_device_memory_gib', out) <= 64
  assert re.search(r'^fits: yes$', out, re.M)
  for name in ('model_flops_per_step', 'compiled_flops_per_step', 'step_time_s',
               'tokens_per_day', 'compile_s'):
    assert _value(name, out) > 0, name
  assert re.search(r'GPU-hours, \$[\d,]+ at \$0.25/GPU-hour', out)
  # remat recomputes the forward: compiled matmuls exceed the model's count, within reason
  ratio = _value('compiled_flops_per_step', out) / _value('model_flops_per_step', out)
  assert 1.0 < ratio < 2.0, ratio


@pytest.mark.slow
def test_plan_leaves_the_persistent_compilation_cache_alone(tmp_path):
  """With $JAX_COMPILATION_CACHE_DIR set (the tests' CLI runs set it), plan compiles afresh
  and writes nothing there: compile_s is a real compile, and a compile for a GPU topology
  cannot be loaded back from that cache."""
  cache = tmp_path / 'jax_cache'
  result = run_cli('--experiment=cwm_1b_1gpu', '--mode=plan', '--config.plan.target=cpu',
                   f'--workdir={tmp_path / "run"}', env={'JAX_COMPILATION_CACHE_DIR': str(cache)},
                   timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _value('compile_s', result.stdout) > 0
  assert not cache.exists() or not any(cache.iterdir()), sorted(cache.iterdir())


def test_a_config_that_cannot_fit_says_no_and_exits_1():
  """cwm_1b with XLA attention (10k x 10k scores per head) and no micro-batching."""
  result = run_cli('--experiment=cwm_1b', '--mode=plan', '--config.model.attention=xla',
                   '--config.train.microbatches=1', '--config.plan.target=cpu', timeout=600)
  assert result.returncode == 1, result.stderr[-3000:]
  assert _value('per_device_memory_gib', result.stdout) > 64
  assert re.search(r'^fits: no$', result.stdout, re.M)


def test_plan_needs_a_cluster_section():
  result = run_cli('--experiment=smoke', '--mode=plan')
  assert result.returncode == 2
  assert 'smoke has no cluster section' in result.stderr


def test_the_target_is_the_gpus_when_the_cuda_plugin_is_here(monkeypatch):
  config = config_lib.resolve('cwm_1b', [])
  for installed in (True, False):
    monkeypatch.setattr(gpu, 'compiler_available', lambda installed=installed: installed)
    assert plan.target(config) == ('gpu' if installed else 'cpu')
    cpu = config_lib.resolve('cwm_1b', ['--config.plan.target=cpu'])
    assert plan.target(cpu) == 'cpu'
  with pytest.raises(config_lib.ConfigError, match='requirements-cuda.txt'):
    plan.target(config_lib.resolve('cwm_1b', ['--config.plan.target=gpu']))
  with pytest.raises(config_lib.ConfigError, match="plan.target='tpu'"):
    plan.target(config_lib.resolve('cwm_1b', ['--config.plan.target=tpu']))
  result = run_cli('--experiment=cwm_1b', '--mode=plan', '--config.cluster.gpu=A100')
  assert result.returncode == 2
  assert "cluster.gpu='A100' is not a GPU brainscale knows" in result.stderr


def test_flops_count_scan_bodies_times_their_length_and_shard_map_bodies_per_device():
  def scanned(x_BxD, w_LxDxD):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_BxD, w_LxDxD)[0]

  x, w = jnp.ones((4, 32)), jnp.ones((12, 32, 32))
  jaxpr = jax.make_jaxpr(scanned)(x, w).jaxpr
  assert plan.jaxpr_flops(jaxpr) == 12 * 2 * 4 * 32 * 32
  grad = jax.make_jaxpr(jax.grad(lambda x, w: scanned(x, w).sum(), argnums=1))(x, w).jaxpr
  assert plan.jaxpr_flops(grad) == 3 * 12 * 2 * 4 * 32 * 32   # forward, dX and dW

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(jax.P('data'), jax.P()),
                          out_specs=jax.P('data'))
  jaxpr = jax.make_jaxpr(sharded)(jnp.ones((16, 32)), w[0]).jaxpr
  assert plan.jaxpr_flops(jaxpr) == 2 * 16 * 32 * 32
  assert np.isclose(plan.jaxpr_flops(jax.make_jaxpr(lambda a, b: a @ b)(x, w[0]).jaxpr),
                    2 * 4 * 32 * 32)


def test_plan_compiles_cudnn_as_pallas_and_what_save_attention_saves_of_cudnn():
  planned = plan._plan_config(
      config_lib.resolve('cwm_1b_1gpu', ['--config.model.remat=save_attention']))
  assert (planned.model.attention, planned.model.remat) == ('pallas', 'full')
  planned = plan._plan_config(config_lib.resolve(
      'cwm_1b_1gpu', ['--config.model.attention=pallas', '--config.model.remat=save_attention']))
  assert (planned.model.attention, planned.model.remat) == ('pallas', 'save_attention')


def test_the_cpu_plan_compiles_bfloat16_compute_as_float16_and_leaves_float32():
  """Same bytes per element; XLA:CPU would keep f32 copies of bf16 buffers."""
  assert plan._plan_config(config_lib.resolve('cwm_80b', [])).model.compute_dtype == 'float16'
  assert plan._plan_config(config_lib.resolve('cwm_tiny', [])).model.compute_dtype == 'float32'


def test_flops_skip_equations_whose_results_are_never_used():
  x = jnp.ones((16, 32))
  jaxpr = jax.make_jaxpr(lambda a: (a @ a.T, a.T @ a)[1])(x).jaxpr
  assert sum(e.primitive.name == 'dot_general' for e in jaxpr.eqns) == 2   # one of them dead
  assert plan.jaxpr_flops(jaxpr) == 2 * 32 * 32 * 16
