"""The GPU path, compiled by XLA's GPU compiler on this CPU for H100s (no GPU present).

Needs JAX's CUDA plugin (pip install -r requirements-cuda.txt); skipped without it,
and failed instead under BRAINSCALE_REQUIRE_CUDA=1, as CI sets.
"""

import os
import re

import jax
import pytest

from brainscale import config as config_lib
from brainscale import parallel
from brainscale.plan import gpu, plan
from brainscale.train import step as step_lib
from experiments import base
from test_train import run_cli

if not gpu.compiler_available():
  WHY = "JAX's CUDA plugin is not installed: pip install -r requirements-cuda.txt"
  if os.environ.get('BRAINSCALE_REQUIRE_CUDA') == '1':
    pytest.fail(f'{WHY} (BRAINSCALE_REQUIRE_CUDA=1)', pytrace=False)
  pytest.skip(WHY, allow_module_level=True)

# As on a GPU: bf16 compute (the tiny experiments compute in fp32 for the CPU's sake).
# smoke's 17 tokens are odd, which cuDNN needs padded. Enigma with one layer per stack.
FAMILIES = {name: ['--config.model.compute_dtype=bfloat16']
            for name in ('smoke', 'cwm_tiny', 'enigma_tiny')}
FAMILIES['enigma_tiny'] += ['--config.model.video_layers=1', '--config.model.decoder_layers=1']


def on_gpus(name: str, overrides=(), *, nodes: int = 1, gpus_per_node: int = 1):
  """`name`'s config with a cluster section of H100s (the tiny experiments have none)."""
  c = config_lib.resolve(name, list(overrides))
  with c.unlocked():
    c.cluster = base.cluster(nodes=nodes, gpus_per_node=gpus_per_node, time_limit='1:00:00')
  return c


def build_on_gpus(config):
  """The train step's setup on the cluster's GPUs (nothing traced)."""
  devices = gpu.topology(config.cluster)
  return step_lib.build(config, parallel.make_mesh(config.mesh, devices,
                                                   nodes=config.cluster.nodes))


def trace_step(config):
  """The train step traced for the cluster's GPUs: (setup, traced)."""
  setup = build_on_gpus(config)
  batch = setup.task.batch_shapes(config.train.batch_size)
  shardings = step_lib.batch_shardings(setup, batch)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
           for k, v in batch.items()}
  return setup, step_lib.make_train_step(setup, batch).trace(setup.abstract_state, batch)


def _value(name: str, text: str) -> float:
  return float(re.search(rf'^{name}: ([\d.e+]+)', text, re.M).group(1))


@pytest.mark.parametrize('backend', ['xla', 'cudnn', 'pallas'])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_every_family_compiles_for_an_h100_with_each_attention_backend(family, backend):
  config = on_gpus(family, FAMILIES[family] + [f'--config.model.attention={backend}',
                                               '--config.train.batch_size=4'])
  p = plan.compile_step(config, 'gpu')
  assert p.compiled_for == '1 x NVIDIA H100 80GB HBM3'
  assert 0 < p.per_device_gib < 1
  kinds = p.analysis.by_kind(gpu.GPUS['H100-SXM-80GB'])
  assert kinds['matmul']['flops'] > 0
  if backend == 'cudnn':
    assert kinds['attention']['launches'] > 0 and 'pallas kernel' not in kinds
  elif backend == 'pallas':
    assert kinds['pallas kernel']['launches'] > 0 and 'attention' not in kinds
  else:
    assert 'attention' not in kinds and 'pallas kernel' not in kinds
  # The HLO's FLOPs (gemms, cuDNN, Pallas metadata) agree with the step's jaxpr (the one
  # compiled: one GPU, so the jaxpr's count is this device's).
  assert p.analysis.flops() == pytest.approx(p.jaxpr_flops, rel=0.1)
  if family == 'smoke':   # an odd length, which cuDNN trains on only padded
    assert p.tokens_per_example % 2 == 1
  assert p.compiled_flops >= p.model_flops


def test_collectives_of_a_two_node_mesh_by_axis_and_link():
  """smoke over 2 nodes x 4 GPUs: fsdp across nodes, tensor within."""
  config = on_gpus('smoke', ['--config.mesh.dcn.fsdp=2', '--config.mesh.ici.fsdp=1',
                             '--config.mesh.ici.tensor=4', '--config.model.dim=256',
                             '--config.model.heads=8', '--config.model.kv_heads=4',
                             '--config.model.mlp_hidden=1024', '--config.model.attention=cudnn'],
                   nodes=2, gpus_per_node=4)
  p = plan.compile_step(config, 'gpu')
  assert p.compiled_for == '8 x NVIDIA H100 80GB HBM3' and p.mesh == {'fsdp': 2, 'tensor': 4}
  table = p.analysis.collective_bytes()
  links = {(axes, link) for (_, axes, link) in table}
  assert ('fsdp', 'InfiniBand') in links and ('tensor', 'NVLink') in links
  assert ('fsdp', 'NVLink') not in links and ('tensor', 'InfiniBand') not in links
  # Gradients are reduce-scattered over fsdp: about this device's share of them crosses nodes.
  grads = sum(b for (op, axes, link), b in table.items()
              if op == 'reduce-scatter' and axes == 'fsdp')
  setup = build_on_gpus(config)
  params = sum(x.size for x in jax.tree.leaves(setup.abstract_state['params']))
  assert 0.5 * params * 2 / 8 <= grads <= 4 * params * 4 / 8
  text, fits = plan.report(config, p)
  assert fits and 'predicted_mfu: ' in text and 'InfiniBand' in text


def test_attention_flops_are_counted_inside_cudnn_and_pallas():
  """benchmarks/mfu.py's compiled FLOPs: the same step with each backend differs only by
  what each attention computes (xla: the whole square; cuDNN: 2 forward and 5 backward
  matmuls; Pallas: 2 forward, 3 for dQ and 4 for dK/dV), and never falls below the model's."""
  flops, model = {}, None
  for backend in ('xla', 'cudnn', 'pallas'):
    config = on_gpus('cwm_tiny', FAMILIES['cwm_tiny'] + [f'--config.model.attention={backend}',
                                  '--config.model.remat=none', '--config.train.batch_size=2',
                                  '--config.data.size=64'])   # 640 tokens: whole Pallas tiles
    setup, traced = trace_step(config)
    flops[backend] = plan.jaxpr_flops(traced.jaxpr.jaxpr)
    model = setup.task.flops_per_example() * 2
  m = config.model
  t = setup.task.tokens_per_example()
  one = 2 * 2 * m.heads * t * t * m.head_dim * m.layers   # one matmul over every pair, 2 examples
  assert flops['cudnn'] - flops['xla'] == pytest.approx((7 / 2 - 6) * one, rel=1e-6)
  delta = 2 * 2 * t * m.heads * m.head_dim * m.layers   # the Pallas backward's rowsum(dO * O)
  assert flops['pallas'] - flops['xla'] == pytest.approx((9 / 2 - 6) * one + delta, rel=1e-6)
  assert min(flops.values()) >= model


@pytest.mark.slow
@pytest.mark.parametrize('experiment', ['cwm_1b_1gpu', 'enigma_1b_1gpu'])
def test_single_gpu_configs_compile_as_committed_and_fit_an_h100(experiment):
  result = run_cli(f'--experiment={experiment}', '--mode=plan', timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert 'compiled_for: 1 x NVIDIA H100 80GB HBM3' in out
  assert _value('per_device_memory_gib', out) <= 0.8 * 80
  assert re.search(r'^fits: yes$', out, re.M)
  low, high = map(float, re.search(r'^predicted_mfu: ([\d.]+) \.\. ([\d.]+)', out, re.M).groups())
  assert 0 < low <= high < 1


@pytest.mark.slow
@pytest.mark.parametrize('experiment,devices,nodes', [('cwm_80b', 192, 24), ('enigma_1b', 64, 8),
                                                      ('cwm_1b', 8, 1)])
def test_cluster_plans_compile_for_the_clusters_gpus(experiment, devices, nodes):
  result = run_cli(f'--experiment={experiment}', '--mode=plan', timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert f'compiled_for: {devices} x NVIDIA H100 80GB HBM3' in out
  assert _value('per_device_memory_gib', out) <= 64
  assert re.search(r'^fits: yes$', out, re.M)
  assert re.search(r'^  (all-gather|reduce-scatter|all-reduce) +\w+', out, re.M)
  if nodes > 1:
    assert _value('collective_gb_infiniband', out) > 0
  low, high = map(float, re.search(r'^predicted_mfu: ([\d.]+) \.\. ([\d.]+)', out, re.M).groups())
  assert 0 < low <= high < 1
  fast, slow = map(float, re.search(r'^predicted_step_s: ([\d.]+) \.\. ([\d.]+)', out,
                                    re.M).groups())
  assert fast <= slow and _value('predicted_compute_s', out) <= fast
  ratio = _value('compiled_flops_per_step', out) / _value('model_flops_per_step', out)
  assert 1.0 < ratio < 2.0, ratio


@pytest.mark.slow
def test_an_oversized_config_says_no_and_exits_1():
  """cwm_1b with XLA attention (10k x 10k scores per head) and no micro-batching."""
  result = run_cli('--experiment=cwm_1b', '--mode=plan', '--config.model.attention=xla',
                   '--config.train.microbatches=1', timeout=600)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'compiled_for: 8 x NVIDIA H100 80GB HBM3' in result.stdout
  assert _value('per_device_memory_gib', result.stdout) > 64
  assert re.search(r'^fits: no$', result.stdout, re.M)


def test_pallas_kernels_do_not_spill_at_the_models_tiles():
  """Every flash kernel at every model shape, through Triton and ptxas for sm_90a."""
  from benchmarks import kernel_resources, shapes  # noqa: PLC0415  (needs the CUDA wheels)
  for name in ('cwm_10k', 'cwm_1b_10k', 'enigma_local', 'enigma_global', 'enigma_read',
               'enigma_decode'):
    found = kernel_resources.resources(shapes.SHAPES[name])
    assert sorted(r.kernel for r in found) == ['flash_attention_dkv', 'flash_attention_dq',
                                               'flash_attention_fwd'], name
    for r in found:
      assert r.spill_stores == r.spill_loads == r.stack == 0, (name, r)
      assert r.registers <= 255 and r.blocks_per_sm >= 1, (name, r)
      assert 0 < r.shared <= 227 * 1024, (name, r)


def test_the_gpu_targets():
  h100, h200 = gpu.spec('H100-SXM-80GB'), gpu.spec('H200-SXM-141GB')
  devices = gpu.topology(base.cluster(nodes=2, gpus_per_node=4, time_limit='1:00:00',
                                      gpu='H200-SXM-141GB'))
  assert len(devices) == 8 and devices[0].device_kind == 'NVIDIA H200'
  assert sorted({d.process_index for d in devices}) == [0, 1]
  assert 79 < h100.hbm_gib < 80 and 140 < h200.hbm_gib < 141
  with pytest.raises(config_lib.ConfigError, match="cluster.gpu='A100'"):
    gpu.spec('A100')
