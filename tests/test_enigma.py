"""Enigma: tokens, the task mixture, masking invariances, sizes by describe, sharded training."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from brainscale import config as config_lib
from brainscale import parallel
from brainscale.enigma import evaluation, masking, tokens
from brainscale.enigma import task as task_lib
from brainscale.enigma.model import Enigma
from brainscale.plan import gpu
from brainscale.train import describe
from brainscale.train import step as step_lib

W, C, H, WD = 60, 5, 36, 64
SMALL = ['--config.model.dim=64', '--config.model.heads=4', '--config.model.mlp_hidden=128',
         '--config.model.neurons=256', '--config.model.sessions=4', '--config.model.animals=2',
         '--config.model.compute_dtype=float32', '--config.train.batch_size=8']


def _batch(rng, b=4, m=16, real=None) -> dict:
  real = m if real is None else real
  neuron_mask = np.arange(m) < real
  return {
      'responses': (rng.poisson(1.0, (b, W, m)) * neuron_mask).astype(np.float32),
      'responses_mask': (rng.random((b, W, m)) > 0.1) & neuron_mask,
      'neurons': np.where(neuron_mask, rng.integers(1, 200, (b, m)), 0).astype(np.int32),
      'neuron_mask': np.broadcast_to(neuron_mask, (b, m)).copy(),
      'positions': (rng.normal(size=(b, m, 3)) * neuron_mask[:, None]).astype(np.float32),
      'session': rng.integers(0, 4, b).astype(np.int32),
      'animal': rng.integers(0, 2, b).astype(np.int32),
      'frames': rng.integers(0, 256, (b, W, H, WD), dtype=np.uint8),
      'frames_mask': np.ones((b, W), bool),
      'behavior': rng.normal(size=(b, W, C)).astype(np.float32),
      'behavior_mask': rng.random((b, W, C)) > 0.1,
      'times': np.tile(np.arange(W, dtype=np.float32) / 30, (b, 1)),
      'trial': np.zeros(b, np.int32), 'start': np.zeros(b, np.int32),
  }


def _model(extra=(), seed=0):
  c = config_lib.resolve('enigma_tiny', SMALL + list(extra))
  return c, Enigma(c.model, neurons=256, sessions=128, animals=128, window=W, rate=30.0,
                   channels=C, frame_shape=(H, WD), rngs=nnx.Rngs(seed))


# ------------------------------------------------------------------ tokens

def test_neuron_tokens_are_a_strided_conv_of_the_seen_trace(rng):
  conv = tokens.NeuronTokens(8, 3, kernel=10, stride=5, rngs=nnx.Rngs(0))
  trace = rng.normal(size=(2, 30, 4)).astype(np.float32)
  seen = rng.random((2, 30, 4)) > 0.3
  seen[:, :, 3] = False                      # neuron 3 is never seen
  ident = rng.normal(size=(2, 4, 3)).astype(np.float32)
  tok, valid, times = conv(trace, seen, ident)
  w = np.asarray(conv.w_conv_Kx2xD[...])
  wi = np.asarray(conv.w_identity_ExD[...])
  s = (30 - 10) // 5 + 1
  assert tok.shape == (2, 4 * s, 8) and valid.shape == (2, 4 * s)
  for b in range(2):
    for n in range(4):
      for j in range(s):
        x = np.where(seen[b, 5 * j:5 * j + 10, n], trace[b, 5 * j:5 * j + 10, n], 0)
        ref = x @ w[:, 0] + seen[b, 5 * j:5 * j + 10, n] @ w[:, 1] + ident[b, n] @ wi
        np.testing.assert_allclose(tok[b, n * s + j], ref, rtol=1e-4, atol=1e-5)
        assert valid[b, n * s + j] == seen[b, 5 * j:5 * j + 10, n].any()
        assert times[n * s + j] == 5 * j + 4.5


def test_video_tokens_are_tubelets_in_time_then_space_order(rng):
  video = tokens.VideoTokens(6, (36, 64), (5, 9, 16), rngs=nnx.Rngs(0))
  frames = rng.integers(0, 256, (1, 20, 36, 64), dtype=np.uint8)
  seen = np.ones((1, 20), bool)
  seen[0, 5:10] = False                      # the second tubelet's frames are missing
  tok, valid, times = video(frames, seen)
  assert tok.shape == (1, 4 * 16, 6)
  w = np.asarray(video.w_patch_PxD[...])
  where = np.asarray(video.w_where_GxD[...])
  x = (frames.astype(np.float32) / 255 - 0.5) * 4
  s, gy, gx = 2, 1, 3                        # tubelet 2, patch row 1, column 3
  patch = x[0, 10:15, 9:18, 48:64].reshape(-1)
  np.testing.assert_allclose(tok[0, s * 16 + gy * 4 + gx], patch @ w + where[gy * 4 + gx],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(tok[0, 16 + 5], where[5], atol=1e-6)   # unseen: position only
  assert not valid[0, 16:32].any() and valid[0, :16].all() and valid[0, 32:].all()
  assert times[0] == 2.0 and times[16] == 7.0


# ------------------------------------------------------------------ readout

def test_gaussian_readout_weighs_the_grid_around_each_receptive_field():
  _, model = _model()
  core = model.core
  gh, gw = core.video_tokens.grid
  rf_Mx2 = np.array([[0.0, 0.0], [-0.6, 0.3], [0.75, -0.75]], np.float32)   # (x, y) in [-1, 1]
  # the identity carries arctanh(rf) through w_rf_Ex2; the place map is switched off
  core.w_rf_Px2[...] = jnp.zeros_like(core.w_rf_Px2[...])
  core.w_rf_Ex2[...] = jnp.eye(*core.w_rf_Ex2.shape)
  core.log_rf_width[...] = jnp.log(0.7)
  identity = np.zeros((1, 3, core.w_rf_Ex2.shape[0]), np.float32)
  identity[0, :, :2] = np.arctanh(rf_Mx2)
  place = np.zeros((1, 3, core.w_rf_Px2.shape[0]), np.float32)
  mask_MxG = np.asarray(core._gaussian(jnp.asarray(place), jnp.asarray(identity)))[0]
  x_G, y_G = np.meshgrid((np.arange(gw) + 0.5) / gw * 2 - 1, (np.arange(gh) + 0.5) / gh * 2 - 1)
  d2_MxG = (((x_G.reshape(-1) - rf_Mx2[:, :1]) / (1.4 / gw)) ** 2 +
            ((y_G.reshape(-1) - rf_Mx2[:, 1:]) / (1.4 / gh)) ** 2)
  expected_MxG = np.exp(-d2_MxG / 2) / np.exp(-d2_MxG / 2).sum(1, keepdims=True)
  np.testing.assert_allclose(mask_MxG, expected_MxG, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(mask_MxG.sum(1), 1.0, rtol=1e-5)
  nearest = np.argmin(d2_MxG, 1)
  assert (mask_MxG.argmax(1) == nearest).all() and nearest[2] == gw - 1   # top row, last column


def test_each_bin_reads_its_own_and_earlier_tubelets_of_the_video():
  c, model = _model()
  core = model.core
  pt, stride, k = c.model.video_patch[0], c.model.decode_stride, core.readout_tubelets
  gh, gw = core.video_tokens.grid
  s, d = W // pt, c.model.dim
  assert k == -(-(stride + round(c.model.readout_seconds * 30)) // pt)
  # each video token's features are its tubelet's number + 1 in every channel
  video = np.repeat(np.arange(s) + 1.0, gh * gw)[None, :, None] * np.ones((1, 1, d), np.float32)
  video_ok = np.ones(video.shape[:2], bool)
  video_ok[:, 3 * gh * gw:4 * gh * gw] = False   # tubelet 3 unseen: it reads as zeros
  place = np.zeros((1, 2, core.w_rf_Px2.shape[0]), np.float32)
  identity = np.zeros((1, 2, c.model.neuron_dim), np.float32)
  for lag in range(k):
    w = np.zeros((k, d, d), np.float32)
    w[lag] = np.eye(d)
    core.w_readout_KxDxD[...] = jnp.asarray(w)
    read_MxTxD = np.asarray(core.readout(jnp.asarray(video, jnp.float32), jnp.asarray(video_ok),
                                         jnp.asarray(place), jnp.asarray(identity)))[0]
    last_T = (stride * np.arange(W // stride) + stride - 1) // pt
    tubelet_T = last_T - lag
    expected_T = np.where((tubelet_T >= 0) & (tubelet_T != 3), tubelet_T + 1.0, 0.0)
    np.testing.assert_allclose(read_MxTxD, np.broadcast_to(expected_T[None, :, None],
                                                           read_MxTxD.shape), rtol=1e-5)


# ------------------------------------------------------------------ masks

def test_each_task_sees_and_predicts_what_it_should(rng):
  batch = _batch(rng, b=8)
  tasks = jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3])
  m = jax.device_get(masking.for_task(tasks, batch, jax.random.key(int(rng.integers(1 << 30)))))
  ok, bok = batch['responses_mask'], batch['behavior_mask']
  for i, name in enumerate(np.asarray(tasks)):
    nin, ntg = m.neuron_in_BxWxM[i], m.neuron_target_BxWxM[i]
    bin_, btg = m.behavior_in_BxWxC[i], m.behavior_target_BxWxC[i]
    assert not (nin & ntg).any() and not (bin_ & btg).any()     # never predict what is seen
    assert not ((nin | ntg) & ~ok[i]).any() and not ((bin_ | btg) & ~bok[i]).any()
    if name == 0:     # encoding
      assert not nin.any() and (ntg == ok[i]).all() and (bin_ == bok[i]).all() and not btg.any()
    if name == 1:     # cosmoothing: whole neurons are shown or predicted
      shown = nin.any(0)
      assert shown.any() and (~shown).any()
      assert ((nin | ntg) == ok[i]).all() and not (ntg[:, shown]).any()
    if name == 2:     # forecasting: one split time for neurons and behaviour
      cut = np.argmax(~(nin.any(1) | bin_.any(1))) if not nin.all() else W
      assert not nin[cut:].any() and not ntg[:cut].any()
      assert not bin_[cut:].any() and not btg[:cut].any() and W // 4 <= cut <= 3 * W // 4
    if name == 3:     # behaviour decoding
      assert (nin == ok[i]).all() and not ntg.any() and not bin_.any() and (btg == bok[i]).all()


def test_tasks_are_drawn_in_proportion_to_their_weights(rng):
  batch = _batch(rng, b=4000, m=2)
  m = masking.sample(batch, jax.random.key(int(rng.integers(1 << 30))), (1.0, 0.0, 3.0, 4.0))
  counts = np.bincount(np.asarray(m.task_B), minlength=4) / 4000
  np.testing.assert_allclose(counts, [0.125, 0.0, 0.375, 0.5], atol=0.03)
  with pytest.raises(ValueError, match=r'task weights \(1, 1\): expected 4'):
    masking.sample(batch, jax.random.key(0), (1, 1))


def test_a_task_no_example_drew_reports_nan_not_zero(rng):
  c, model = _model(['--config.loss.tasks=(1.0, 0.0, 0.0, 0.0)'])
  loss, metrics = task_lib.Task(c).loss(model, _batch(rng), jax.random.key(0), train=True)
  assert np.isfinite(float(loss)) and float(metrics['nll_encoding']) > 0
  assert np.isnan(float(metrics['nll_cosmoothing']))
  assert np.isnan(float(metrics['nll_forecasting']))


# --------------------------------------------------------------- model

def test_hidden_and_padding_inputs_do_not_change_the_predictions(rng):
  """What a task hides, or a padded neuron slot holds, cannot reach the outputs."""
  _, model = _model()
  batch = _batch(rng, b=4, m=16, real=12)
  forward = nnx.jit(lambda model, batch, task: model(batch, masking.fixed(batch, task)),
                    static_argnums=2)
  rates, behav = forward(model, batch, 'encoding')
  assert rates.shape == (4, W, 16) and behav.shape == (4, W, C) and (np.asarray(rates) > 0).all()
  other = dict(batch, responses=rng.poisson(3.0, (4, W, 16)).astype(np.float32))
  np.testing.assert_allclose(forward(model, other, 'encoding')[0], rates, rtol=1e-5, atol=1e-6)
  # behaviour decoding must ignore the behaviour it predicts, not the neurons
  r_dec, b_dec = forward(model, batch, 'behavior')
  other = dict(batch, behavior=rng.normal(size=(4, W, C)).astype(np.float32))
  np.testing.assert_allclose(forward(model, other, 'behavior')[1], b_dec, rtol=1e-5, atol=1e-6)
  assert not np.allclose(forward(model, other, 'encoding')[0], rates, atol=1e-4)
  # padding: more empty neuron slots leave the real neurons' predictions unchanged
  wide = {k: v for k, v in batch.items()}
  for k in ('responses', 'responses_mask'):
    wide[k] = np.concatenate([batch[k], np.zeros((4, W, 8), batch[k].dtype)], 2)
  for k in ('neurons', 'neuron_mask', 'positions'):
    wide[k] = np.concatenate([batch[k], np.zeros((4, 8) + batch[k].shape[2:], batch[k].dtype)], 1)
  np.testing.assert_allclose(forward(model, wide, 'behavior')[0][..., :16], r_dec,
                             rtol=1e-4, atol=1e-5)


def test_forecasting_never_sees_the_future(rng):
  _, model = _model()
  batch = _batch(rng, b=2)
  masks = masking.for_task(jnp.asarray([2, 2]), batch, jax.random.key(1))
  cut = int(np.argmin(np.asarray(masks.neuron_in_BxWxM[0]).any(1)))
  rates, _ = model(batch, masks)
  later = dict(batch)
  later['responses'] = batch['responses'].copy()
  later['responses'][:, cut:] = rng.poisson(5.0, later['responses'][:, cut:].shape)
  later['behavior'] = batch['behavior'].copy()
  later['behavior'][:, cut:] += 3.0
  np.testing.assert_allclose(model(later, masks)[0], rates, rtol=1e-5, atol=1e-6)


def test_window_starts_cover_every_sample_once_with_context():
  for length, window in [(300, 60), (61, 60), (60, 60), (173, 40)]:
    seen = np.zeros(length, int)
    for start, keep in evaluation.window_starts(length, window):
      assert start + window <= length and (start == 0 or keep >= window // 2)
      seen[start + keep:start + window] += 1
    assert (seen == 1).all()
  with pytest.raises(ValueError, match='59 samples is shorter than the window of 60'):
    evaluation.window_starts(59, 60)


# ------------------------------------------------------------- describe + sharding

def test_describe_enigma_1b_core_params_without_allocating():
  c = config_lib.resolve('enigma_1b', [])
  text = describe.describe(c)
  core = int(re.search(r'^core_params: (\d+)', text, re.M).group(1))
  per_neuron = int(re.search(r'^per_neuron_params: (\d+)', text, re.M).group(1))
  assert 0.95e9 <= core <= 1.1e9, core
  assert per_neuron == c.model.neurons * c.model.neuron_dim
  assert "over 64 devices" in text and c.cluster.nodes == 8
  total = float(re.search(r'^  total\s+([\d.]+) GiB', text, re.M).group(1))
  assert total < gpu.spec(c.cluster.gpu).hbm_gib


def _two_steps(batch, sizes, devices, extra=()):
  """(setup, losses, params after) of two training steps on a mesh of `sizes`."""
  c = config_lib.resolve('enigma_tiny', SMALL + list(extra))
  c.mesh.ici.update(sizes)
  setup = step_lib.build(c, parallel.make_mesh(c.mesh, devices=devices))
  state = step_lib.init_state(setup)
  step = step_lib.make_train_step(setup, batch)
  losses = []
  for _ in range(2):
    state, metrics = step(state, step_lib.global_batch(setup, batch))
    losses.append(float(metrics['loss']))
  return setup, losses, jax.device_get(state['params'])


def test_sharded_training_on_8_devices_matches_one_device(rng):
  batch = _batch(rng, b=8, m=16, real=13)
  setup8, losses8, after8 = _two_steps(batch, dict(data=2, fsdp=2, tensor=2), jax.devices())
  _, losses1, after1 = _two_steps(batch, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  w_q = setup8.abstract_state['params']['core']['tower']['layers']['blocks'][0]['attn']['w_q_DxNxH']
  assert set(a for a in w_q.sharding.spec if a) == {'fsdp', 'tensor'}
  np.testing.assert_allclose(losses8, losses1, rtol=2e-5)
  assert np.isfinite(losses8).all()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5), after8, after1)


@pytest.mark.slow
def test_pallas_attention_trains_like_xla(rng):
  """Local (time window) and global tower layers, the latents' read and the decoder, all
  with padded keys, through the flash kernels on 8 devices vs the XLA reference on one."""
  batch = _batch(rng, b=8, m=16, real=13)
  _, losses_p, after_p = _two_steps(batch, dict(data=2, fsdp=2, tensor=2), jax.devices(),
                                    ['--config.model.attention=pallas'])
  _, losses_x, after_x = _two_steps(batch, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  np.testing.assert_allclose(losses_p, losses_x, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
               after_p, after_x)
