"""The Attention module, Block and the scanned Stack (its remat policies and parameter axes)
against einsums written out here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from brainscale import nn
from brainscale.nn.attention import Mask
from nn_helpers import (
  EXACT,
  FP32_DEEP,
  attend_ref_jnp,
  call,
  close,
  close_trees,
  mask_ref,
  mlp_manual,
  normal,
  rope_rotate_jnp,
  run,
  run_vjp,
)


def rms_ref(x_xD, scale_D, eps=1e-6):
  x32 = x_xD.astype(jnp.float32)
  return x32 / jnp.sqrt(jnp.mean(x32 ** 2, axis=-1, keepdims=True) + eps) * scale_D


def attention_manual(mod, x_BxTxD, kv_BxSxE, *, mask_BxTxS, rope_q=None, rope_k=None):
  kv_BxSxE = x_BxTxD if kv_BxSxE is None else kv_BxSxE
  q = jnp.einsum('btd,dnh->btnh', x_BxTxD, mod.w_q_DxNxH[...])
  k = jnp.einsum('bse,ekh->bskh', kv_BxSxE, mod.w_k_ExKxH[...])
  v = jnp.einsum('bse,ekh->bskh', kv_BxSxE, mod.w_v_ExKxH[...])
  if mod.q_norm is not None:
    q, k = rms_ref(q, mod.q_norm.scale_D[...]), rms_ref(k, mod.k_norm.scale_D[...])
  if rope_q is not None:
    q = rope_rotate_jnp(q, rope_q)
  if rope_k is not None:
    k = rope_rotate_jnp(k, rope_k)
  out = attend_ref_jnp(q, k, v, mask_BxTxS)
  return jnp.einsum('btnh,nhd->btd', out, mod.w_o_NxHxD[...])


def block_manual(blk, x_BxTxD, *, mask_BxTxS):
  normed = rms_ref(x_BxTxD, blk.attn_norm.scale_D[...])
  h = x_BxTxD + attention_manual(blk.attn, normed, None, mask_BxTxS=mask_BxTxS)
  return h + mlp_manual(blk.mlp, rms_ref(h, blk.mlp_norm.scale_D[...]))


def randomize_norms(module, rng):
  """Gives every RMSNorm in `module` a random scale (init is all ones)."""
  for _, m in nnx.iter_modules(module):
    if isinstance(m, nn.RMSNorm):
      m.scale_D[...] = normal(rng, *m.scale_D.shape)


# ----------------------------------------------------------------------------- Attention

@pytest.mark.parametrize('cross,qk_norm,use_rope', [(False, False, False), (False, True, True),
                                                     (True, False, True), (True, True, False)])
def test_attention_module_matches_einsums(rng, seed, qk_norm, cross, use_rope):
  b, t, d, n, kv, h = 2, 5, 16, 4, 2, 8
  s, e = (7, 12) if cross else (5, 0)
  mod = nn.Attention(d, n, h, num_kv_heads=kv, kv_dim=e, qk_norm=qk_norm, rngs=nnx.Rngs(seed))
  randomize_norms(mod, rng)
  assert (mod.q_norm is None) == (not qk_norm)
  assert mod.w_k_ExKxH.shape == ((e if cross else d), kv, h)
  x_BxTxD, ct_BxTxD = normal(rng, b, t, d), normal(rng, b, t, d)
  kv_BxSxE = normal(rng, b, s, e) if cross else None
  kwargs = dict(mask=Mask(causal=not cross))
  ref_kwargs = dict(mask_BxTxS=mask_ref(b, t, s, causal=not cross))
  if use_rope:
    rope = dict(rope_q=nn.rope_1d(jnp.asarray(rng.uniform(0, 9, (b, t)), jnp.float32), h),
                rope_k=nn.rope_1d(jnp.asarray(rng.uniform(0, 9, (b, s)), jnp.float32), h))
    kwargs.update(rope)
    ref_kwargs.update(rope)
  graphdef, state = nnx.split(mod)
  out_BxTxD, (dstate, dargs) = run_vjp(call, graphdef, state, (x_BxTxD, kv_BxSxE), kwargs,
                                       ct_BxTxD)
  assert out_BxTxD.shape == (b, t, d)
  ref_BxTxD, (dstate_ref, dargs_ref) = run_vjp(
      attention_manual, graphdef, state, (x_BxTxD, kv_BxSxE), ref_kwargs, ct_BxTxD)
  close(out_BxTxD, ref_BxTxD, FP32_DEEP)
  close_trees((dstate, dargs), (dstate_ref, dargs_ref), FP32_DEEP)


# ----------------------------------------------------------------------------- Block / Stack

@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
def test_block_matches_manual(rng, seed, mlp):
  blk = nn.Block(16, 4, 8, 32, num_kv_heads=2, mlp=mlp, qk_norm=True, rngs=nnx.Rngs(seed))
  randomize_norms(blk, rng)
  x_BxTxD = normal(rng, 2, 5, 16)
  graphdef, state = nnx.split(blk)
  # Values only: the gradients of Attention and the MLPs have tests of their own.
  close(run(call, graphdef, state, (x_BxTxD,), dict(mask=Mask(causal=True))),
        run(block_manual, graphdef, state, (x_BxTxD,),
            dict(mask_BxTxS=mask_ref(2, 5, 5, causal=True))), FP32_DEEP)


def make_block(rngs):
  return nn.Block(16, 4, 8, 32, num_kv_heads=2, mlp='swiglu', qk_norm=True, rngs=rngs)


def test_stack_equals_sequential_layers(rng, seed):
  stack = nn.Stack(make_block, 3, remat='full', rngs=nnx.Rngs(seed))
  randomize_norms(stack, rng)
  x_BxTxD = normal(rng, 2, 5, 16)
  rope = nn.rope_1d(jnp.asarray(rng.uniform(0, 9, (2, 5)), jnp.float32), 8)
  kwargs = dict(mask=Mask(causal=True, window=3), rope_q=rope, rope_k=rope)
  graphdef, state = nnx.split(stack.layers)
  layer_states = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(3)]
  assert not np.allclose(layer_states[0]['attn']['w_q_DxNxH'][...],
                         layer_states[1]['attn']['w_q_DxNxH'][...])
  expected = x_BxTxD
  for layer_state in layer_states:
    expected = run(call, graphdef, layer_state, (expected,), kwargs)
  stack_graphdef, stack_state = nnx.split(stack)
  # (kwargs must reach every layer for this to hold)
  close(run(call, stack_graphdef, stack_state, (x_BxTxD,), kwargs), expected, FP32_DEEP)


@pytest.mark.parametrize('remat', sorted(nn.REMAT_POLICIES))
def test_stack_remat_matches_none(rng, seed, remat):
  x_BxTxD, ct_BxTxD = normal(rng, 2, 5, 16), normal(rng, 2, 5, 16)
  kwargs = dict(mask=Mask(causal=True))
  results = {}
  for policy in (remat, 'none'):
    stack = nn.Stack(make_block, 3, remat=policy, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(stack)
    results[policy] = state, run_vjp(call, graphdef, state, (x_BxTxD,), kwargs, ct_BxTxD)
  (state, (out, grads)), (state_ref, (out_ref, grads_ref)) = results[remat], results['none']
  close_trees(state, state_ref, EXACT)
  close(out, out_ref, FP32_DEEP)
  close_trees(grads, grads_ref, FP32_DEEP)


def test_stack_param_axes_and_bad_remat(seed):
  stack = nn.Stack(make_block, 3, rngs=nnx.Rngs(seed))
  single = make_block(nnx.Rngs(0))
  single_axes = {p: nn.axes_of(v) for p, v in nnx.to_flat_state(nnx.state(single, nnx.Param))}
  flat = nnx.to_flat_state(nnx.state(stack, nnx.Param))
  assert len(flat) == len(single_axes) == 11
  for path, variable in flat:
    assert path[0] == 'layers'
    assert nn.axes_of(variable) == ('layers',) + single_axes[path[1:]]
    assert variable.shape[0] == 3 and variable.ndim == len(nn.axes_of(variable))
  with pytest.raises(ValueError, match='remat'):
    nn.Stack(make_block, 3, remat='some', rngs=nnx.Rngs(seed))
