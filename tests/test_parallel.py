"""Tests of brainscale.parallel (mesh, rules, specs, constraints) and of the sharded train step.

The key test runs the smoke trainer on a 1-device mesh and on 8-device meshes
(data / fsdp / tensor parallel) and requires the same losses, gradients
(through Adam's moments) and parameters, step by step.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from brainscale import config as config_lib
from brainscale import parallel
from brainscale.config import ConfigError
from brainscale.train import step as step_lib

# fp32 train steps of the same model on different meshes differ only in reduction order.
PARAMS = dict(rtol=1e-5, atol=1e-5)     # parameters (|p| ~ 0.25) and scalar metrics
MOMENTS = dict(rtol=1e-4, atol=3e-8)    # Adam's mu (<~ 1e-2) and nu (<~ 1e-4); entries of mu
                                        # that are sums cancelling to ~0 differ by up to ~7e-9

RULES = dict(batch='data,fsdp', length='sequence', embed='fsdp', heads='tensor',
             mlp='tensor', vocab='tensor', layers='', act_mlp='tensor')


@pytest.fixture
def seed(request) -> int:
  return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def rng(seed) -> np.random.Generator:
  return np.random.default_rng(seed)


def mesh_config(ici: dict, dcn: dict | None = None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(ici=ici, dcn=dcn or {}))


def mesh_of(**ici) -> jax.sharding.Mesh:
  """A mesh over all 8 test devices."""
  return parallel.make_mesh(mesh_config(ici))


def close_trees(actual, expected, tol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                               err_msg=jax.tree_util.keystr(path), **tol)


def test_conftest_gives_eight_devices():
  assert jax.device_count() == 8


# ----------------------------------------------------------------------------- mesh_shape

@pytest.mark.parametrize('ici, expected', [
    (dict(fsdp=-1), dict(data=1, fsdp=16, sequence=1, tensor=1)),
    (dict(data=2, fsdp=-1, tensor=2), dict(data=2, fsdp=4, sequence=1, tensor=2)),
    (dict(data=-1, tensor=4), dict(data=4, fsdp=1, sequence=1, tensor=4)),
    (dict(data=2, fsdp=2, sequence=2, tensor=2), dict(data=2, fsdp=2, sequence=2, tensor=2)),
])
def test_mesh_shape_fills_minus_one_in_ici(ici, expected):
  dcn, resolved = parallel.mesh_shape(mesh_config(ici), num_devices=16, num_nodes=1)
  assert resolved == expected
  assert dcn == dict(data=1, fsdp=1, sequence=1, tensor=1)


def test_mesh_shape_fills_minus_one_in_dcn():
  dcn, ici = parallel.mesh_shape(mesh_config(dict(fsdp=-1), dict(data=-1)),
                                 num_devices=32, num_nodes=4)
  assert dcn == dict(data=4, fsdp=1, sequence=1, tensor=1)
  assert ici == dict(data=1, fsdp=8, sequence=1, tensor=1)


def test_mesh_shape_splits_dcn_from_ici():
  dcn, ici = parallel.mesh_shape(mesh_config(dict(fsdp=-1), dict(data=2)),
                                 num_devices=8, num_nodes=2)
  assert dcn == dict(data=2, fsdp=1, sequence=1, tensor=1)
  assert ici == dict(data=1, fsdp=4, sequence=1, tensor=1)
  assert {a: dcn[a] * ici[a] for a in parallel.AXES} == dict(data=2, fsdp=4, sequence=1, tensor=1)


def test_mesh_shape_two_minus_ones_raise():
  with pytest.raises(ConfigError, match='mesh.ici has -1 on data, fsdp; at most one'):
    parallel.mesh_shape(mesh_config(dict(data=-1, fsdp=-1)), num_devices=16, num_nodes=1)
  with pytest.raises(ConfigError, match='mesh.dcn has -1 on data, tensor; at most one'):
    parallel.mesh_shape(mesh_config(dict(fsdp=-1), dict(data=-1, tensor=-1)),
                        num_devices=16, num_nodes=2)


@pytest.mark.parametrize('ici, fragments', [
    (dict(data=2, fsdp=4, tensor=3), ['data=2', 'fsdp=4', 'tensor=3', 'needs 24 devices',
                                      'this job has 16']),
    (dict(data=2, fsdp=2), ['data=2', 'fsdp=2', 'needs 4 devices', 'this job has 16']),
    (dict(data=3, fsdp=-1), ['data=3', 'needs a multiple of 3 devices', 'this job has 16']),
])
def test_mesh_shape_size_mismatch_names_axes_and_device_count(ici, fragments):
  with pytest.raises(ConfigError) as e:
    parallel.mesh_shape(mesh_config(ici), num_devices=16, num_nodes=1)
  message = str(e.value)
  assert message.startswith('mesh.ici')
  for fragment in fragments:
    assert fragment in message
  assert '\n' not in message


def test_mesh_shape_dcn_mismatch_names_the_node_count():
  with pytest.raises(ConfigError, match=r'mesh.dcn \(data=3\) needs 3 devices, this job has 2'):
    parallel.mesh_shape(mesh_config(dict(fsdp=-1), dict(data=3)), num_devices=8, num_nodes=2)


def test_mesh_shape_devices_not_splitting_over_nodes_raise():
  with pytest.raises(ConfigError, match='do not split evenly over 3 nodes'):
    parallel.mesh_shape(mesh_config(dict(fsdp=-1)), num_devices=8, num_nodes=3)


@pytest.mark.parametrize('part', ['ici', 'dcn'])
def test_mesh_shape_unknown_axis_raises(part):
  config = mesh_config({'fsdp': -1, 'model': 2}) if part == 'ici' else mesh_config(
      dict(fsdp=-1), {'pipeline': 2})
  with pytest.raises(ConfigError, match=f'mesh.{part} has unknown axes'):
    parallel.mesh_shape(config, num_devices=8, num_nodes=1)


def test_mesh_shape_zero_axis_raises_config_error():
  with pytest.raises(ConfigError, match=r'mesh.ici.data=0; an axis size is a positive'):
    parallel.mesh_shape(mesh_config(dict(data=0, fsdp=-1)), num_devices=8, num_nodes=1)


@pytest.mark.parametrize('ici', [dict(data=-2, fsdp=-1), dict(data=-2, fsdp=-4)])
def test_mesh_shape_negative_axis_raises_config_error(ici):
  with pytest.raises(ConfigError, match=r'mesh.ici.data=-2; an axis size is a positive'):
    parallel.mesh_shape(mesh_config(ici), num_devices=8, num_nodes=1)


# ----------------------------------------------------------------------------- make_mesh

def test_make_mesh_has_all_axes_sized_by_config():
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  assert mesh.axis_names == ('data', 'fsdp', 'sequence', 'tensor')
  assert dict(mesh.shape) == dict(data=2, fsdp=2, sequence=1, tensor=2)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_over_a_device_list():
  devices = jax.devices()[2:6]
  mesh = parallel.make_mesh(mesh_config(dict(data=2, fsdp=-1)), devices=devices)
  assert dict(mesh.shape) == dict(data=2, fsdp=2, sequence=1, tensor=1)
  assert set(mesh.devices.flat) == set(devices)


def test_make_mesh_over_one_device_is_all_ones():
  mesh = parallel.make_mesh(mesh_config(dict(fsdp=-1)), devices=jax.devices()[:1])
  assert dict(mesh.shape) == dict(data=1, fsdp=1, sequence=1, tensor=1)


def test_make_mesh_device_list_is_one_node_so_dcn_must_be_one():
  with pytest.raises(ConfigError, match='mesh.dcn'):
    parallel.make_mesh(mesh_config(dict(fsdp=-1), dict(data=2)), devices=jax.devices()[:4])


def test_make_mesh_puts_each_node_on_its_own_dcn_slice(monkeypatch):
  # Two "nodes" of 4 devices each; dcn data=2 x ici data=2 x ici fsdp=2.
  monkeypatch.setattr(parallel, 'num_nodes', lambda: 2)
  mesh = parallel.make_mesh(mesh_config(dict(data=2, fsdp=-1), dict(data=2)))
  assert dict(mesh.shape) == dict(data=4, fsdp=2, sequence=1, tensor=1)
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  node_of_data_index = (ids // 4).reshape(4, -1)
  # Data indices 0, 1 live on node 0 and 2, 3 on node 1; ici axes vary within a node.
  np.testing.assert_array_equal(node_of_data_index, [[0, 0], [0, 0], [1, 1], [1, 1]])


# ----------------------------------------------------------------------------- rules and spec

def test_rules_table_parses_lists_and_empty():
  table = parallel.rules_table(ml_collections.ConfigDict(
      dict(batch='data,fsdp', heads=' tensor ', norm='', seq='sequence , data')))
  assert table == dict(batch=('data', 'fsdp'), heads=('tensor',), norm=(),
                       seq=('sequence', 'data'))


def test_rules_table_unknown_mesh_axis_raises():
  with pytest.raises(ConfigError, match="mesh.rules.batch='data,model' names mesh axis 'model'"):
    parallel.rules_table(ml_collections.ConfigDict(dict(batch='data,model')))


def test_rules_table_of_base_config():
  table = parallel.rules_table(config_lib.load('smoke').mesh.rules)
  assert table['batch'] == ('data', 'fsdp')
  assert table['layers'] == ()


@pytest.mark.parametrize('logical, expected', [
    (('batch', 'length', None), P(('data', 'fsdp'), 'sequence', None)),
    (('layers', 'embed', 'mlp'), P(None, 'fsdp', 'tensor')),
    (('embed', 'heads', None), P('fsdp', 'tensor', None)),
    ((), P()),
])
def test_spec_maps_logical_names(logical, expected):
  assert parallel.spec(logical, parallel.rules_table(RULES)) == expected


def test_spec_never_uses_a_mesh_axis_twice():
  rules = parallel.rules_table(RULES)
  # 'batch' takes data and fsdp; 'embed' (fsdp) is then left replicated.
  assert parallel.spec(('batch', 'embed'), rules) == P(('data', 'fsdp'), None)
  assert parallel.spec(('embed', 'batch'), rules) == P('fsdp', 'data')
  assert parallel.spec(('heads', 'mlp'), rules) == P('tensor', None)


def test_spec_drops_size_one_mesh_axes():
  rules = parallel.rules_table(RULES)
  mesh = mesh_of(data=8, fsdp=1)
  assert parallel.spec(('batch', 'embed', 'mlp'), rules, mesh) == P('data', None, None)
  mesh = mesh_of(fsdp=2, tensor=4)
  assert parallel.spec(('batch', 'embed', 'mlp'), rules, mesh) == P('fsdp', None, 'tensor')


def test_spec_checks_divisibility_and_names_the_parameter():
  rules = parallel.rules_table(RULES)
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  assert parallel.spec(('embed', 'vocab'), rules, mesh, (64, 32), 'head/w') == P('fsdp', 'tensor')
  with pytest.raises(ConfigError) as e:
    parallel.spec(('embed', 'vocab'), rules, mesh, (64, 33), 'head/w_DxV')
  message = str(e.value)
  assert 'head/w_DxV' in message and 'vocab=33' in message and "('tensor',)" in message


def test_shardings_error_names_the_parameter_path():
  rules = parallel.rules_table(RULES)
  mesh = mesh_of(fsdp=8)
  axes = {'embed': {'table_VxD': ('vocab', 'embed')}, 'head': {'w_DxV': ('embed', 'vocab')}}
  shapes = {'embed': {'table_VxD': jax.ShapeDtypeStruct((32, 64), jnp.float32)},
            'head': {'w_DxV': jax.ShapeDtypeStruct((60, 32), jnp.float32)}}
  with pytest.raises(ConfigError, match='head/w_DxV dim 0'):
    parallel.shardings(axes, shapes, mesh, rules)


def test_shardings_of_a_tree():
  rules = parallel.rules_table(RULES)
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  axes = {'w_DxF': ('embed', 'mlp'), 'scale_D': (None,)}
  shapes = {'w_DxF': jax.ShapeDtypeStruct((8, 6), jnp.float32),
            'scale_D': jax.ShapeDtypeStruct((8,), jnp.float32)}
  out = parallel.shardings(axes, shapes, mesh, rules)
  assert out['w_DxF'].spec == P('fsdp', 'tensor')
  assert out['scale_D'].spec == P(None)
  assert out['w_DxF'].mesh == mesh


def test_spec_unknown_logical_axis_raises():
  with pytest.raises(ConfigError, match="logical axis 'embedding' of w_DxF has no entry"):
    parallel.spec(('embedding', 'mlp'), parallel.rules_table(RULES), name='w_DxF')


# ----------------------------------------------------------------------------- constrain

def test_constrain_is_a_no_op_outside_axis_rules(rng):
  x_BxF = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
  assert parallel.constrain(x_BxF, ('batch', 'act_mlp')) is x_BxF
  y_BxF = jax.jit(lambda x: parallel.constrain(x * 2, ('batch', 'act_mlp')))(x_BxF)
  assert y_BxF.sharding.is_fully_replicated
  np.testing.assert_array_equal(y_BxF, 2 * x_BxF)


def test_constrain_shards_by_the_rules_inside_jit(rng):
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  x_BxF = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
  f = jax.jit(lambda x: parallel.constrain(x * 2, ('batch', 'act_mlp')))
  with parallel.axis_rules(mesh, parallel.rules_table(RULES)):
    y_BxF = f(x_BxF)
  assert y_BxF.sharding.spec == P(('data', 'fsdp'), 'tensor')
  assert y_BxF.sharding.shard_shape(y_BxF.shape) == (2, 3)
  np.testing.assert_array_equal(y_BxF, 2 * x_BxF)


def test_constrain_splits_flattened_dims_and_leaves_out_axes_that_do_not_divide(rng):
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  rules = {**parallel.rules_table(RULES), 'act_length': ('tensor',)}
  with parallel.axis_rules(mesh, rules):
    # tokens of [B * T, D] split over the batch's axes and the length's
    y_NxD = jax.jit(lambda x: parallel.constrain(x, (('batch', 'act_length'), None)))(
        jnp.zeros((16, 4)))
    assert y_NxD.sharding.spec == P(('data', 'fsdp', 'tensor'))
    # 3 hidden units do not split over tensor=2: they stay whole, the batch still splits
    y_BxN = jax.jit(lambda x: parallel.constrain(x, ('batch', 'act_mlp')))(jnp.zeros((4, 3)))
    assert y_BxN.sharding.spec == P(('data', 'fsdp'))
    with pytest.raises(ConfigError, match="'nonesuch'"):
      jax.jit(lambda x: parallel.constrain(x, ('nonesuch',)))(jnp.zeros((4,)))


def test_axis_rules_context_is_restored_on_exit():
  mesh = mesh_of(data=8, fsdp=1)
  with pytest.raises(RuntimeError):
    with parallel.axis_rules(mesh, parallel.rules_table(RULES)):
      raise RuntimeError
  x_B = jnp.zeros((8,))
  assert parallel.constrain(x_B, ('batch',)) is x_B


# ------------------------------------------------------------------------- the sharded train step

# fp32 for a tight comparison. The smoke warmup stays: step 0 has learning rate 0 (its
# gradients still reach Adam's moments) and later steps a small one. At a full learning
# rate, Adam's first update lr * g / (|g| + eps) turns the last-bit differences of a
# near-zero gradient into differences of up to ~lr in that parameter.
BASE = ('--config.model.compute_dtype=float32',)


def smoke_config(seed: int, overrides=()):
  return config_lib.override(config_lib.load('smoke'),
                             [*BASE, f'--config.seed={seed}', *overrides])


@functools.cache
def trajectory(seed: int, overrides: tuple = (), steps: int = 3, devices: int = 8):
  """Runs `steps` train steps of the smoke task; returns host copies of everything."""
  c = smoke_config(seed, overrides)
  setup = step_lib.build(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:devices]))
  state = step_lib.init_state(setup)
  data = setup.task.train_data(0, 1)
  batches = [next(data) for _ in range(steps)]
  train_step = step_lib.make_train_step(setup, batches[0])
  initial, states, metrics = jax.device_get(state['params']), [], []
  for batch in batches:
    state, m = train_step(state, step_lib.global_batch(setup, batch))
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return dict(setup=setup, batches=batches, initial=initial, states=states, metrics=metrics,
              final=state)


def train_seed(name: str) -> int:
  # One seed for all tests that share the 1-device reference run (compiled once).
  return zlib.crc32(f'{__name__}::{name}'.encode()) % 2**31


@pytest.mark.parametrize('mesh_overrides, batch_rows_per_shard, params_sharded', [
    pytest.param(('--config.mesh.ici.data=2', '--config.mesh.ici.fsdp=2',
                  '--config.mesh.ici.tensor=2'), 8, True, id='data2_fsdp2_tensor2'),
    pytest.param(('--config.mesh.ici.data=8', '--config.mesh.ici.fsdp=1'), 4, False, id='data8'),
    pytest.param(('--config.mesh.ici.fsdp=8',), 4, True, id='fsdp8'),
])
def test_sharded_train_step_equals_single_device(mesh_overrides, batch_rows_per_shard,
                                                 params_sharded):
  seed = train_seed('train_step')
  one = trajectory(seed, devices=1)
  many = trajectory(seed, mesh_overrides, devices=8)
  assert dict(one['setup'].mesh.shape) == dict(data=1, fsdp=1, sequence=1, tensor=1)
  assert many['setup'].mesh.size == 8
  for a, b in zip(one['batches'], many['batches']):
    close_trees(a, b, dict(rtol=0, atol=0))

  # Same seed, same initial parameters, whatever their sharding.
  close_trees(many['initial'], one['initial'], dict(rtol=0, atol=0))
  assert one['metrics'][-1]['learning_rate'] > 0
  for m_many, m_one in zip(many['metrics'], one['metrics']):
    close_trees(m_many, m_one, PARAMS)
  for s_many, s_one in zip(many['states'], one['states']):
    close_trees(s_many['params'], s_one['params'], PARAMS)
    close_trees(s_many['opt_state'], s_one['opt_state'], MOMENTS)
    assert s_many['step'] == s_one['step']
  # The trajectory moved: the comparison above is not of three copies of the init.
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), one['states'][-1]['params'],
                       one['initial'])
  assert min(jax.tree.leaves(moved)) > 1e-4

  # The 8-device run really is distributed: the batch is split, parameters as the rules say.
  inputs_BxT = step_lib.global_batch(many['setup'], many['batches'][0])['inputs']
  assert len(inputs_BxT.addressable_shards) == 8
  assert inputs_BxT.sharding.shard_shape(inputs_BxT.shape) == (batch_rows_per_shard, 17)
  params = many['final']['params']
  split = [jax.tree_util.keystr(path) for path, p in jax.tree_util.tree_leaves_with_path(params)
           if any(axis is not None for axis in p.sharding.spec)
           and len(p.addressable_shards) > 1
           and p.addressable_shards[0].data.shape != p.shape]
  assert bool(split) == params_sharded, split
  for p in jax.tree.leaves(params):
    assert p.sharding.mesh.size == 8


def test_gradient_accumulation_equals_one_big_batch():
  # Step 0 (learning rate 0) compares the gradients through Adam's moments, step 1 the
  # update they make.
  seed = train_seed('train_step')
  whole = trajectory(seed, devices=1)
  micro = trajectory(seed, ('--config.train.microbatches=2',), steps=2, devices=1)
  assert micro['metrics'][-1]['learning_rate'] > 0
  for step in range(2):
    close_trees(micro['batches'][step], whole['batches'][step], dict(rtol=0, atol=0))
    close_trees(micro['metrics'][step], whole['metrics'][step], PARAMS)  # loss, grad_norm
    close_trees(micro['states'][step]['opt_state'], whole['states'][step]['opt_state'], MOMENTS)
    close_trees(micro['states'][step]['params'], whole['states'][step]['params'], PARAMS)
