"""Opening checkpoints for inference: params only, cast as read, on a data x tensor mesh."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx
from jax.sharding import PartitionSpec as P
from matplotlib import image as mpimg

from brainscale import config as config_lib
from brainscale import inspect, parallel
from brainscale.config import ConfigError
from brainscale.cwm import counterfactual
from brainscale.train import loop
from brainscale.train.checkpoint import Checkpoints
from brainscale.train.task import costs, get_task
from conftest import ROOT
from test_train import cli_env

# cwm_tiny, smaller; 4 heads and a vocab of 1152 split over tensor 4
TINY = ['--config.model.layers=2', '--config.model.dim=32', '--config.model.heads=4',
        '--config.model.head_dim=8', '--config.model.mlp_hidden=64',
        '--config.tokenizer.model.channels=16', '--config.tokenizer.experiment=']
TRAINING_MESH = ['--config.mesh.ici.data=2', '--config.mesh.ici.fsdp=4']


def save_initialised(workdir, experiment: str, overrides: list[str]):
  """Step 0 of the experiment's freshly initialised train state, saved on its training mesh;
  returns (workdir, the state)."""
  config = config_lib.resolve(experiment, overrides)
  setup = loop.build(config)
  state = loop.init_state(setup)
  checkpoints = Checkpoints(str(workdir), keep=1, async_save=False)
  checkpoints.save(0, state, None, config)
  checkpoints.close()
  return workdir, state, setup


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """cwm_tiny's state as a (data 2 x fsdp 4) training mesh saved it."""
  return save_initialised(tmp_path_factory.mktemp('inference') / 'cwm', 'cwm_tiny',
                          TINY + TRAINING_MESH)


def tensor_mesh():
  return parallel.inference_mesh(4, jax.devices())   # data 2 x tensor 4


def flat(tree) -> dict:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def cached_log_probs(run, codes_Bx2xhxw, context_BxC, queries_BxQ, teacher_BxQx4):
  """Log-probs [B, Q, 4, codes] of the KV-cached parallel decode, under the run's layout."""
  @nnx.jit
  def decode(model, codes, context, queries, teacher):
    return counterfactual.decode_patches(model, codes, context, queries, cached=True,
                                         teacher_BxQx4=teacher)[1]

  with run.axis_rules():
    return np.asarray(decode(run.model, codes_Bx2xhxw, context_BxC, queries_BxQ, teacher_BxQx4))


@pytest.mark.slow
def test_a_training_checkpoint_opens_in_bf16_on_a_tensor_mesh(saved, rng):
  workdir, state, setup = saved
  assert dict(setup.mesh.shape) == dict(data=2, fsdp=4, sequence=1, tensor=1)
  run = inspect.load(workdir, dtype=jnp.bfloat16, mesh=tensor_mesh())
  want, got = flat(state['params']), flat(run.params)
  assert got.keys() == want.keys()
  for name, x in got.items():
    assert x.dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[name].astype(jnp.bfloat16)),
                                  err_msg=name)
  attn = run.params['blocks']['layers']['attn']
  assert attn['w_q_DxNxH'].sharding.spec == P(None, None, 'tensor', None)   # heads
  assert attn['w_o_NxHxD'].sharding.spec == P(None, 'tensor', None, None)
  assert run.params['blocks']['layers']['mlp']['w_in_DxF'].sharding.spec == P(None, None, 'tensor')
  assert run.params['head']['w_DxV'].sharding.spec == P(None, 'tensor')
  assert run.params['norm']['scale_D'].sharding.spec == P(None,)   # embed: replicated
  assert attn['w_q_DxNxH'].addressable_shards[0].data.shape == (2, 32, 1, 8)

  # Cached decoding on the tensor mesh (batch over data, heads over tensor) against the
  # float32 model on one device.
  one = inspect.load(workdir, dtype=jnp.float32, mesh=parallel.inference_mesh(1, jax.devices()[:1]))
  layout = one.model.layout
  h, w = layout.grid[0] * 2, layout.grid[1] * 2
  codes = jnp.asarray(rng.integers(0, layout.codebook, (2, 2, h, w)), jnp.int32)
  order = np.stack([rng.permutation(layout.patches) for _ in range(2)]).astype(np.int32)
  context, queries = jnp.asarray(order[:, :20]), jnp.asarray(order[:, 20:26])
  teacher = jnp.asarray(rng.integers(0, layout.codebook, (2, 6, 4)), jnp.int32)
  reference = cached_log_probs(one, codes, context, queries, teacher)
  sharded = cached_log_probs(run, codes, context, queries, teacher)
  assert reference.shape == sharded.shape == (2, 6, 4, layout.codebook)
  assert np.isfinite(sharded).all()
  np.testing.assert_allclose(sharded, reference, atol=0.05, rtol=0.02)
  assert np.abs(sharded - reference).mean() < 0.01


def _bytes_read() -> int:
  """This process's bytes read through read()/pread() so far (page-cache hits included)."""
  with open('/proc/self/io') as f:
    return int(next(line for line in f if line.startswith('rchar:')).split()[1])


@pytest.mark.slow
def test_a_tensor_mesh_reads_each_stored_chunk_once(tmp_path):
  """Orbax reads a target shard in whole stored chunks, so tensor shards that cut across the
  fsdp-split chunks would each read them all when Orbax's bytes in flight are fewer than an
  array's (96 GB against cwm_80b's 103 GB MLP matrices; reading the tensor layout directly
  read 3.1x here): the params are read in whole chunks per device, then laid out on device.
  The model is cwm_tiny at dim 256, so that chunk bytes outweigh the metadata files."""
  wider = ['--config.model.dim=256', '--config.model.head_dim=64',
           '--config.model.mlp_hidden=1024']   # after TINY's: the last of a key wins
  workdir, state, _ = save_initialised(tmp_path / 'cwm', 'cwm_tiny',
                                       TINY + wider + TRAINING_MESH)
  checkpoints = Checkpoints(str(workdir), keep=1_000_000, async_save=False)
  config = inspect.saved_config(checkpoints.config(0))
  target = inspect.abstract_params(get_task(config), tensor_mesh(), jnp.bfloat16)[1]
  largest = max(x.nbytes for x in jax.tree.leaves(state['params']))
  kvstore = ts.KvStore.open({'driver': 'ocdbt',
                             'base': f'file://{workdir}/checkpoints/0/state/'}).result()
  stored = sum(len(kvstore.read(key).result().value) for key in kvstore.list().result()
               if key.startswith(b'params.'))
  before = _bytes_read()
  params = checkpoints.restore_params(0, target, concurrent_gb=0.95 * largest / 1e9)
  read = _bytes_read() - before
  checkpoints.close()
  assert stored > 4e6 and read <= 1.2 * stored, (read, stored)   # 1.1x: the metadata files
  got, saved_params, wanted = flat(params), flat(state['params']), flat(target)
  for name, x in got.items():
    assert x.sharding == wanted[name].sharding, name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(saved_params[name]).astype(x.dtype),
                                  err_msg=name)


@pytest.mark.slow
def test_the_optimizer_state_is_never_read(saved, tmp_path):
  workdir, state, setup = saved
  copy = tmp_path / 'cwm'
  shutil.copytree(workdir, copy)
  # Delete every opt_state array (its chunks and its zarr metadata) from the OCDBT database.
  state_dir = copy / 'checkpoints' / '0' / 'state'
  kvstore = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{state_dir}/'}).result()
  before = len(kvstore.list().result())
  kvstore.delete_range(ts.KvStore.KeyRange(b'opt_state.', b'opt_state/')).result()
  kept = kvstore.list().result()
  assert len(kept) < before and not [k for k in kept if k.startswith(b'opt_state')]
  assert [k for k in kept if k.startswith(b'params.')]

  checkpoints = Checkpoints(str(copy), keep=1, async_save=False)
  with pytest.raises(Exception, match='opt_state'):
    checkpoints.restore(0, setup.abstract_state)       # a training restore needs it
  checkpoints.close()
  got = flat(inspect.load(copy, dtype=jnp.bfloat16, mesh=tensor_mesh()).params)
  want = flat(state['params'])
  assert got.keys() == want.keys()
  for name, x in got.items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[name].astype(jnp.bfloat16)),
                                  err_msg=name)


@pytest.mark.slow
def test_an_export_opens_and_predicts_like_its_workdir(saved, tmp_path):
  workdir, state, _ = saved
  out = tmp_path / 'exported'
  done = subprocess.run([sys.executable, '-m', 'brainscale.export', str(workdir), str(out),
                         '--dtype=bfloat16'], cwd=ROOT, env=cli_env(4), capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'exported step 0 to {out}' in done.stdout and 'bfloat16' in done.stdout
  # Only the params were written, in bf16.
  kvstore = ts.KvStore.open({'driver': 'ocdbt',
                             'base': f'file://{out}/checkpoints/0/state/'}).result()
  keys = kvstore.list().result()
  assert keys and all(k.startswith(b'params.') for k in keys)
  zarray = json.loads(kvstore.read(b'params.head.w_DxV/.zarray').result().value)
  assert zarray['dtype'] == 'bfloat16'

  exported = inspect.load(out)
  assert exported.config.inference.dtype == 'bfloat16' and exported.step == 0
  for name, x in flat(exported.params).items():
    assert x.dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat(state['params'])[name]
                                                            .astype(jnp.bfloat16)), err_msg=name)
  again = subprocess.run([sys.executable, '-m', 'brainscale.export', str(workdir), str(out)],
                         cwd=ROOT, env=cli_env(1), capture_output=True, text=True, timeout=300)
  assert again.returncode == 2 and 'already holds checkpoints' in again.stderr

  frames = np.random.default_rng(0).integers(0, 255, (2, 48, 48, 3), np.uint8)
  paths = [tmp_path / 'a.png', tmp_path / 'b.png']
  for path, frame in zip(paths, frames):
    mpimg.imsave(path, frame)
  arrays = []
  for source, dtype in ((out, []), (workdir, ['--dtype=bfloat16'])):
    run = subprocess.run([sys.executable, 'launch/predict.py', f'--workdir={source}', *dtype,
                          f'--frames={paths[0]},{paths[1]}', '--move=4,4:40,44',
                          f'--out={tmp_path / source.name}'],
                         cwd=ROOT, env=cli_env(1), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    arrays.append(dict(np.load(tmp_path / source.name / 'prediction.npz')))
  assert arrays[0].keys() == arrays[1].keys() and 'moved' in arrays[0]
  for name in arrays[0]:
    np.testing.assert_array_equal(arrays[0][name], arrays[1][name], err_msg=name)


@pytest.mark.slow
def test_enigma_core_and_neuron_tables_open_in_bf16_on_one_device(tmp_path):
  workdir, state, _ = save_initialised(tmp_path / 'enigma', 'enigma_tiny', [
      '--config.model.video_layers=1', '--config.model.decoder_layers=1'])
  one = parallel.inference_mesh(1, jax.devices()[:1])
  run = inspect.load(workdir, dtype='bfloat16', mesh=one)
  want, got = flat(state['params']), flat(run.params)
  assert got.keys() == want.keys()
  assert any('neuron_NxE' in name for name in got) and any('core' in name for name in got)
  for name, x in got.items():
    assert x.dtype == jnp.bfloat16 and x.sharding.device_set == {jax.devices()[0]}, name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[name].astype(jnp.bfloat16)),
                                  err_msg=name)
  # The bf16 params (upcast: XLA:CPU has no bf16 x bf16 -> f32 dot) against the f32 ones.
  reference = inspect.load(workdir, dtype='float32', mesh=one)
  graphdef, params = nnx.split(run.model)
  upcast = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.float32), params))
  batch = costs(run.task).synthetic_batch(2, seed=1)
  losses = [float(run.task.loss(model, batch, jax.random.key(0), False)[0])
            for model in (upcast, reference.model)]
  assert np.isfinite(losses).all() and losses[0] == pytest.approx(losses[1], rel=0.03)
  with pytest.raises(ConfigError, match='dtype=int8; expected a floating dtype'):
    inspect.load(workdir, dtype='int8', mesh=one)
