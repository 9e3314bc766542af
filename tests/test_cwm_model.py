"""CWM world model: sizes by describe, sharded forward/backward, frozen tokenizer, prerequisites."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from brainscale import config as config_lib
from brainscale import parallel
from brainscale.cwm import sequence
from brainscale.cwm.task import Task
from brainscale.plan import gpu
from brainscale.train import describe
from brainscale.train import step as step_lib
from test_train import run_cli

SMALL = ['--config.model.layers=2', '--config.model.dim=64', '--config.model.heads=4',
         '--config.model.head_dim=16', '--config.model.mlp_hidden=256',
         '--config.train.batch_size=8', '--config.model.remat=full']


def _params_line(text: str) -> int:
  return int(re.search(r'^params: (\d+)', text, re.M).group(1))


@pytest.mark.parametrize('name,low,high', [('cwm_80b', 78e9, 82e9), ('cwm_1b', 0.8e9, 1.3e9)])
def test_describe_sizes_without_allocating(name, low, high):
  c = config_lib.resolve(name, [])
  text = describe.describe(c)
  n = _params_line(text)
  assert low <= n <= high, n
  total_gib = float(re.search(r'^  total\s+([\d.]+) GiB', text, re.M).group(1))
  assert total_gib < gpu.spec(c.cluster.gpu).hbm_gib, f'analytic memory {total_gib} GiB per device'
  if name == 'cwm_80b':
    assert "mesh: {'data': 3, 'fsdp': 64} over 192 devices" in text
    # every sharded dimension divides: the spec table printed without IndivisibleError
    assert 'blocks/layers/mlp' in text


@pytest.mark.slow
def test_describe_on_the_cli_sizes_the_cluster_and_lists_the_optimizer_groups():
  """run.py checks the config at the cluster's size (192 GPUs), not this machine's one."""
  result = run_cli('--experiment=cwm_80b', '--mode=describe')
  assert result.returncode == 0, result.stderr[-3000:]
  groups = result.stdout.split('optimizer groups')[1].splitlines()[1:]
  counts = {line.split()[0]: int(re.search(r'in (\d+) tensors', line).group(1)) for line in groups}
  assert counts == {'default': 10, 'no_decay': 5, 'tokenizer': 24}
  assert 'frozen' in next(line for line in groups if line.split()[0] == 'tokenizer')


def test_cwm_80b_shape_matches_reference():
  c = config_lib.resolve('cwm_80b', [])
  m = c.model
  assert (m.layers, m.dim, m.heads, m.head_dim, m.mlp_hidden, m.vocab) == (
      96, 8192, 64, 128, 32768, 131072)
  layout = sequence.Layout(c.data.size, c.data.size, codebook=2 ** c.tokenizer.model.bits)
  assert layout.length == 10_240 and layout.vocab <= m.vocab


def _batch(rng, b, size=48):
  return {'frames': rng.integers(0, 256, (b, 2, size, size, 3), dtype=np.uint8),
          'skipped': np.zeros((b,), np.int32)}


def _train_steps(config, mesh, batch, steps=2):
  setup = step_lib.build(config, mesh)
  state = step_lib.init_state(setup)
  before = jax.device_get(state['params'])
  step = step_lib.make_train_step(setup, batch)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, step_lib.global_batch(setup, batch))
    losses.append(float(metrics['loss']))
  return setup, before, jax.device_get(state['params']), losses, metrics


def test_forward_backward_sharded_fsdp_tensor_matches_one_device():
  """8 simulated devices (data 2 x fsdp 2 x tensor 2) give the losses of 1 device."""
  c = config_lib.resolve('cwm_tiny', SMALL + ['--config.model.compute_dtype=float32'])
  batch = _batch(np.random.default_rng(0), 8)
  c.mesh.ici.update(dict(data=2, fsdp=2, tensor=2))
  mesh8 = parallel.make_mesh(c.mesh)
  setup8, _, after8, losses8, metrics = _train_steps(c, mesh8, batch)
  # parameters really are sharded over fsdp and tensor
  w_q = setup8.abstract_state['params']['blocks']['layers']['attn']['w_q_DxNxH']
  assert set(a for a in w_q.sharding.spec if a) == {'fsdp', 'tensor'}
  c1 = config_lib.resolve('cwm_tiny', SMALL + ['--config.model.compute_dtype=float32'])
  c1.mesh.ici.update(dict(data=1, fsdp=1, tensor=1))
  mesh1 = parallel.make_mesh(c1.mesh, devices=jax.devices()[:1])
  _, _, after1, losses1, _ = _train_steps(c1, mesh1, batch)
  np.testing.assert_allclose(losses8, losses1, rtol=2e-5)
  assert np.isfinite(losses8).all() and losses8[1] < losses8[0] + 1.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
               after8, after1)
  assert {'nll_frame0', 'nll_frame1', 'grad_norm', 'data_skipped'} <= set(metrics)


def test_revealed_frame1_patches_carry_no_loss():
  """sequence.reveal: the first k frame-1 patches are context; the loss is on the rest."""
  batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(4), 4).items()}
  losses = {}
  for reveal in (0.0, 1.0):
    c = config_lib.resolve('cwm_tiny', SMALL + [f'--config.sequence.reveal={reveal}',
                                                '--config.sequence.frame0_weight=0.0'])
    task = Task(c)
    model = task.model(nnx.Rngs(0))
    losses[reveal] = float(task.loss(model, batch, jax.random.key(7), True)[0])
  # same model, same order: revealing patches drops them from the mean, so the loss changes
  assert losses[0.0] != losses[1.0]


def test_frames_of_another_size_are_a_clear_error():
  c = config_lib.resolve('cwm_tiny', SMALL)
  c.mesh.ici.update(dict(data=1, fsdp=-1, tensor=1))
  setup = step_lib.build(c, parallel.make_mesh(c.mesh))
  batch = _batch(np.random.default_rng(3), 8, size=64)
  with pytest.raises(ValueError, match=r'frames of 64x64.*data.size=48'):
    step_lib.make_train_step(setup, batch)(step_lib.init_state(setup),
                                           step_lib.global_batch(setup, batch))


def test_tokenizer_is_frozen_and_the_rest_trains():
  c = config_lib.resolve('cwm_tiny', SMALL)
  c.mesh.ici.update(dict(data=1, fsdp=-1, tensor=1))
  _, before, after, _, _ = _train_steps(c, parallel.make_mesh(c.mesh), _batch(
      np.random.default_rng(1), 8))
  jax.tree.map(np.testing.assert_array_equal, before['tokenizer'], after['tokenizer'])
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before['blocks'], after['blocks'])
  assert all(jax.tree.leaves(moved))


def test_model_logits_are_causal_and_depend_on_positions():
  c = config_lib.resolve('cwm_tiny', SMALL + ['--config.model.compute_dtype=float32'])
  task = Task(c)
  model = task.model(nnx.Rngs(0))
  rng = np.random.default_rng(2)
  h, w = task.layout.height // 4, task.layout.width // 4
  codes = rng.integers(0, task.layout.codebook, (1, 2, h, w)).astype(np.int32)
  seq = sequence.build(jnp.asarray(codes), sequence.random_order(jax.random.key(0), 1,
                                                                 task.layout), task.layout)
  x = model.features(seq.tokens_BxL, seq.pos_BxLx3)
  tokens2 = seq.tokens_BxL.at[0, 101].set((seq.tokens_BxL[0, 101] + 1) % task.layout.codebook)
  x2 = model.features(tokens2, seq.pos_BxLx3)
  np.testing.assert_allclose(x[:, :101], x2[:, :101], atol=1e-5)   # the past is untouched
  assert not np.allclose(x[:, 101:], x2[:, 101:])
  x3 = model.features(seq.tokens_BxL, seq.pos_BxLx3 + jnp.array([1.0, 0, 0]) * (
      jnp.arange(seq.tokens_BxL.shape[1]) % 2)[None, :, None])
  assert not np.allclose(x, x3)                                    # 3D RoPE is in use


def test_content_tokens_also_embed_their_latent_pointers_do_not():
  c = config_lib.resolve('cwm_tiny', SMALL + ['--config.model.compute_dtype=float32'])
  task = Task(c)
  model = task.model(nnx.Rngs(0))
  assert model.w_latent_kxD.shape == (model.tokenizer.latent_channels, c.model.dim)
  pos = jnp.zeros((1, 2, 3))
  pointer = jnp.array([[task.layout.codebook, task.layout.codebook + 1]])
  content = jnp.array([[5, 6]])
  before = [model.features(t, pos) for t in (pointer, content)]
  model.w_latent_kxD[...] = model.w_latent_kxD[...] + 1.0
  after = [model.features(t, pos) for t in (pointer, content)]
  np.testing.assert_array_equal(before[0], after[0])
  assert not np.allclose(before[1], after[1])
  off = config_lib.resolve('cwm_tiny', SMALL + ['--config.model.latent_embed=False'])
  assert Task(off).model(nnx.Rngs(0)).w_latent_kxD is None


def test_content_logits_also_score_the_latent_pointer_logits_do_not():
  c = config_lib.resolve('cwm_tiny', SMALL + ['--config.model.compute_dtype=float32'])
  task = Task(c)
  model = task.model(nnx.Rngs(0))
  codes = task.layout.codebook
  head_DxV = np.asarray(model.head.w_DxV[...])
  np.testing.assert_array_equal(model.output_weights(), head_DxV)   # zero-initialised
  w_Dxk = np.random.default_rng(5).normal(size=model.w_unlatent_Dxk.shape).astype(np.float32)
  model.w_unlatent_Dxk[...] = jnp.asarray(w_Dxk)
  out_DxV = np.asarray(model.output_weights())
  # code c's column gains w @ latent(c); pointer and padding columns are the head's
  latent_Cxk = np.asarray(model.tokenizer.codes_to_latent(jnp.arange(codes)))
  np.testing.assert_allclose(out_DxV[:, :codes], head_DxV[:, :codes] + w_Dxk @ latent_Cxk.T,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out_DxV[:, codes:], head_DxV[:, codes:])
  x_1x1xD = jnp.ones((1, 1, c.model.dim))
  np.testing.assert_allclose(model.content_logits(x_1x1xD)[0, 0], out_DxV.sum(0)[:codes],
                             rtol=1e-4, atol=1e-4)
  # the loss trains it
  batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(6), 2).items()}
  grads = nnx.grad(lambda m: task.loss(m, batch, jax.random.key(0), True)[0])(model)
  assert np.abs(np.asarray(grads.w_unlatent_Dxk[...])).max() > 0
  off = config_lib.resolve('cwm_tiny', SMALL + ['--config.model.latent_head=False'])
  model_off = Task(off).model(nnx.Rngs(0))
  assert model_off.w_unlatent_Dxk is None
  np.testing.assert_array_equal(model_off.output_weights(), model_off.head.w_DxV[...])
