"""KV-cached decoding: nn's cache through the scanned Stack, CWM's probes cached vs recomputed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from brainscale import config as config_lib
from brainscale import nn, parallel
from brainscale.cwm import counterfactual, decoding
from brainscale.train import step as step_lib

SMALL = ['--config.model.layers=2', '--config.model.dim=64', '--config.model.heads=4',
         '--config.model.head_dim=16', '--config.model.mlp_hidden=256',
         '--config.model.compute_dtype=float32']


def _stack(rngs, backend='xla'):
  return nn.Stack(lambda r: nn.Block(32, 4, 8, 64, num_kv_heads=2, qk_norm=True, mlp='swiglu',
                                     backend=backend, rngs=r), 3, remat='none', rngs=rngs)


def test_stack_decode_equals_the_full_pass_at_any_positions():
  """Prefill 7 tokens, then 1, then 4: each matches a causal pass over all 12 (GQA, QK-norm,
  rotary at arbitrary positions, so a token's place in the cache is not its position)."""
  stack = _stack(nnx.Rngs(0))
  x_BxTxD = jax.random.normal(jax.random.key(1), (2, 12, 32))
  t_BxT = jax.random.uniform(jax.random.key(2), (2, 12)) * 50
  rope = nn.rope_1d(t_BxT, 8)
  full = stack(x_BxTxD, mask=nn.Mask(causal=True), rope_q=rope, rope_k=rope)
  cache = nn.KVCache.zeros(3, 2, 16, 2, 8)
  outs = []
  for lo, hi in ((0, 7), (7, 8), (8, 12)):
    part = nn.rope_1d(t_BxT[:, lo:hi], 8)
    out, cache = stack.decode(x_BxTxD[:, lo:hi], cache, mask=nn.slot_mask(cache, hi - lo, 2),
                              rope_q=part, rope_k=part)
    outs.append(out)
    assert int(cache.length) == hi
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
  # empty slots after the fed tokens stay zero, and the cache refuses another stack's depth
  assert not np.asarray(cache.k_LxBxSxKxH[:, :, 12:]).any()
  with pytest.raises(ValueError, match='cache holds 2 layers; this stack has 3'):
    stack.decode(x_BxTxD[:, :1], nn.KVCache.zeros(2, 2, 4, 2, 8), mask=nn.Mask())


def test_choose_greedy_top_k_top_p_and_seeds():
  logits_BxQxV = jnp.log(jnp.array([[[0.5, 0.3, 0.15, 0.05]]]))
  assert int(nn.choose(logits_BxQxV)[0, 0]) == 0
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda **kw: np.array([int(nn.choose(logits_BxQxV, k, temperature=1.0, **kw)[0, 0])
                                for k in keys])
  assert set(draw()) == {0, 1, 2, 3}
  assert set(draw(top_k=2)) == {0, 1}
  assert set(draw(top_p=0.75)) == {0, 1}       # 0.5 < 0.75 <= 0.8: the two likeliest
  assert set(draw(top_p=0.4)) == {0}
  assert 0.4 < np.mean(draw() == 0) < 0.6
  same = nn.choose(logits_BxQxV, keys[3], temperature=1.0)
  assert int(same[0, 0]) == int(nn.choose(logits_BxQxV, keys[3], temperature=1.0)[0, 0])
  for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0)):
    with pytest.raises(ValueError, match='expected temperature >= 0'):
      nn.choose(logits_BxQxV, keys[0], **bad)


@pytest.fixture(scope='module')
def world():
  """A randomly initialised small world model (fp32) and two random clips."""
  c = config_lib.resolve('cwm_tiny', SMALL)
  c.mesh.ici.update(dict(data=1, fsdp=1, tensor=1))
  setup = step_lib.build(c, parallel.make_mesh(c.mesh, devices=jax.devices()[:1]))
  model = nnx.merge(setup.graphdef, step_lib.init_state(setup)['params'])
  h, w = model.layout.height, model.layout.width
  frames = jax.random.randint(jax.random.key(1), (2, 2, h, w, 3), 0, 256).astype(jnp.uint8)
  return c, model, frames


def _probe_sets(p: int, seed: int, revealed: int = 5, queries: int = 7):
  """Random context (frame 0 in random order + revealed frame-1 patches) and queries."""
  rng = np.random.default_rng(seed)
  context, asked = [], []
  for _ in range(2):
    shown = rng.permutation(p)[:revealed]
    hidden = np.setdiff1d(np.arange(p), shown)
    context.append(np.concatenate([rng.permutation(p), p + shown]))
    asked.append(p + rng.permutation(hidden)[:queries])
  return jnp.asarray(np.stack(context)), jnp.asarray(np.stack(asked))


@functools.partial(nnx.jit, static_argnames=('sequential', 'cached', 'temperature', 'top_k'))
def _decode(model, codes, context, queries, **kwargs):
  return decoding.decode_patches(model, codes, context, queries, **kwargs)


@pytest.mark.parametrize('sequential', [False, True])
def test_cached_decoding_gives_the_recomputed_logits(world, sequential):
  _, model, frames = world
  codes = model.tokenize(frames)
  for seed in (0, 1):
    context, queries = _probe_sets(model.layout.patches, seed)
    run = lambda cached, **kw: _decode(model, codes, context, queries, sequential=sequential,
                                       cached=cached, **kw)
    tok_r, logp_r = run(False)
    tok_c, logp_c = run(True)
    np.testing.assert_array_equal(tok_c, tok_r)
    np.testing.assert_allclose(logp_c, logp_r, rtol=1e-5, atol=1e-5)
    # sampled with a seed: the same codes either way (they are drawn from equal logits)
    sample = dict(temperature=1.0, top_k=50, key=jax.random.key(seed))
    tok_sr, _ = run(False, **sample)
    tok_sc, logp_sc = run(True, **sample)
    np.testing.assert_array_equal(tok_sc, tok_sr)
    assert not np.array_equal(tok_sc, tok_c)
    # teacher-forced on the sampled codes, the argmax run conditions as the sampled one did
    _, logp_t = run(True, teacher_BxQx4=tok_sc)
    np.testing.assert_allclose(logp_t, logp_sc, rtol=1e-5, atol=1e-5)


def test_cached_decoding_under_a_2x2x2_mesh(world):
  """data 2 x fsdp 2 x tensor 2: batch over data, heads over tensor; the one-device logits."""
  c, model, frames = world
  codes = model.tokenize(frames)
  context, queries = _probe_sets(model.layout.patches, 2)
  want = [decoding.decode_patches(model, codes, context, queries, sequential=s)[1]
          for s in (False, True)]
  c8 = c.copy_and_resolve_references()
  c8.mesh.ici.update(dict(data=2, fsdp=2, tensor=2))
  setup = step_lib.build(c8, parallel.make_mesh(c8.mesh))
  model8 = nnx.merge(setup.graphdef, step_lib.init_state(setup)['params'])
  codes, context, queries = jax.device_put((codes, context, queries),
                                           parallel.replicated(setup.mesh))
  with parallel.axis_rules(setup.mesh, setup.rules):
    cache = nnx.jit(lambda m: m.init_cache(2, 8))(model8)
    assert cache.k_LxBxSxKxH.sharding.spec[1:4] == ('data', None, 'tensor')
    for sequential, logp in zip((False, True), want):
      run = nnx.jit(lambda *a, s=sequential: decoding.decode_patches(*a, sequential=s)[1])
      np.testing.assert_allclose(run(model8, codes, context, queries), logp, rtol=1e-5,
                                 atol=1e-5)


def test_kl_flow_cached_gives_the_recomputed_maps(world):
  """The frame-0 patches no perturbation reaches are fed once; the clean and perturbed
  sequences continue from that cache with the log-probs of whole passes."""
  _, model, frames = world
  h, w = model.layout.height, model.layout.width
  points = jnp.array([[[3.0, 5.0], [w - 2.0, h / 2], [20.0, 30.0]],
                      [[w + 9.0, -4.0], [11.0, 11.0], [40.0, 7.0]]])
  flow = functools.partial(nnx.jit, static_argnames=('orders', 'cached'))(counterfactual.kl_flow)
  cached = flow(model, frames, points, orders=2, key=jax.random.key(3))
  recomputed = flow(model, frames, points, orders=2, key=jax.random.key(3), cached=False)
  kl = np.asarray(recomputed['kl'])
  # KL of two nearly equal distributions magnifies rounding: compare on the map's scale
  np.testing.assert_allclose(cached['kl'], kl, atol=1e-3 * kl.max())
  np.testing.assert_array_equal(cached['cell_centre'], recomputed['cell_centre'])
  codes = model.tokenize(frames)
  variants = jnp.stack([codes, codes.at[:, 0, :2, :2].set(0)], 1)    # patch 0 of frame 0
  reached, window = counterfactual._reached_patches(jnp.zeros((2, 1, 2), jnp.int32), 0,
                                                    model.layout)
  assert window == 1 and reached.sum() == 2 and reached[:, 0].all()
  order = counterfactual._order_reached_last(jax.random.key(4), reached, model.layout)
  assert (order[:, model.layout.patches - 1] == 0).all()
  logp = [counterfactual._variant_log_probs(model, variants, order, prefix)
          for prefix in (0, model.layout.patches - 1)]
  np.testing.assert_allclose(logp[1], logp[0], rtol=1e-5, atol=1e-5)
