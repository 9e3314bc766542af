"""brainscale.nn's RMSNorm, parameters, MLPs, Embed and Head against formulas written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from brainscale import nn
from nn_helpers import BF16, FP32, call, close, close_trees, mlp_manual, normal, run_vjp

# ----------------------------------------------------------------------------- RMSNorm / param

@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('eps', [1e-6, 0.1])
def test_rmsnorm_matches_formula(rng, dtype, eps):
  norm = nn.RMSNorm(16, eps=eps, rngs=nnx.Rngs(0))
  scale_D = normal(rng, 16)
  norm.scale_D[...] = scale_D
  x_BxTxD = normal(rng, 2, 3, 16, dtype=dtype, scale=0.3)  # small: eps=0.1 matters
  out_BxTxD = norm(x_BxTxD)
  x = np.asarray(x_BxTxD.astype(jnp.float32), np.float64)
  expected = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * np.asarray(scale_D)
  assert out_BxTxD.dtype == dtype
  close(out_BxTxD, expected, FP32 if dtype == jnp.float32 else BF16)


def test_rmsnorm_grads(rng):
  norm = nn.RMSNorm(8, rngs=nnx.Rngs(0))
  norm.scale_D[...] = normal(rng, 8)
  x_BxTxD, ct_BxTxD = normal(rng, 2, 3, 8), normal(rng, 2, 3, 8)
  graphdef, state = nnx.split(norm)
  _, (dstate, (dx,)) = run_vjp(call, graphdef, state, (x_BxTxD,), {}, ct_BxTxD)
  dx_ref, dscale_ref = jax.grad(lambda x, s: jnp.sum(
      x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s * ct_BxTxD), (0, 1))(
          x_BxTxD, norm.scale_D[...])
  close(dx, dx_ref, FP32)
  close(dstate['scale_D'][...], dscale_ref, FP32)


def test_param_axes_and_init(seed):
  p = nn.param(nnx.Rngs(seed), (256, 64), ('embed', 'mlp'))
  assert nn.axes_of(p) == ('embed', 'mlp')
  assert abs(float(jnp.std(p[...])) * 16 - 0.88) < 0.05  # truncated(+-2) normal std ~0.88
  assert float(jnp.abs(p[...]).max()) <= 2 / 16 + 1e-6
  assert (nn.param(nnx.Rngs(0), (3,), ('n',), init='ones')[...] == 1).all()
  with pytest.raises(ValueError, match='rank'):
    nn.param(nnx.Rngs(0), (3, 4), ('n',))
  with pytest.raises(ValueError, match='init'):
    nn.param(nnx.Rngs(0), (3,), ('n',), init='uniform')


# ----------------------------------------------------------------------------- MLPs

@pytest.mark.parametrize('kind', ['gelu', 'swiglu'])
def test_mlp_matches_formula(rng, seed, kind):
  mlp = nn.make_mlp(kind, 8, 24, rngs=nnx.Rngs(seed))
  assert isinstance(mlp, {'gelu': nn.GeluMLP, 'swiglu': nn.SwiGLU}[kind])
  x_BxTxD, ct_BxTxD = normal(rng, 2, 3, 8), normal(rng, 2, 3, 8)
  graphdef, state = nnx.split(mlp)
  out, grads = run_vjp(call, graphdef, state, (x_BxTxD,), {}, ct_BxTxD)
  out_ref, grads_ref = run_vjp(mlp_manual, graphdef, state, (x_BxTxD,), {}, ct_BxTxD)
  close(out, out_ref, FP32)
  close_trees(grads, grads_ref, FP32)
  # and the formula in float64 numpy
  x = np.asarray(x_BxTxD, np.float64)
  w = {k: np.asarray(v[...], np.float64) for k, v in vars(mlp).items() if k.startswith('w_')}
  if kind == 'gelu':
    u = x @ w['w_in_DxF']
    hid = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
  else:
    g = x @ w['w_gate_DxF']
    hid = g / (1 + np.exp(-g)) * (x @ w['w_up_DxF'])
  close(out, hid @ w['w_out_FxD'], FP32)


def test_make_mlp_unknown_kind():
  with pytest.raises(ValueError, match='relu'):
    nn.make_mlp('relu', 8, 16, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- Embed / Head

def test_embed_is_one_hot_matmul(rng, seed):
  emb = nn.Embed(11, 8, rngs=nnx.Rngs(seed))
  ids_BxT = jnp.asarray(rng.integers(0, 11, (3, 7)), jnp.int32)
  ids_BxT = ids_BxT.at[0, :3].set(5)  # repeated ids: gradients must accumulate
  ct_BxTxD = normal(rng, 3, 7, 8)
  graphdef, state = nnx.split(emb)
  out_BxTxD, (dstate, _) = run_vjp(call, graphdef, state, (), dict(ids_BxT=ids_BxT), ct_BxTxD)
  table_VxD = emb.table_VxD[...]
  onehot_BxTxV = np.eye(11)[np.asarray(ids_BxT)]
  close(out_BxTxD, onehot_BxTxV @ np.asarray(table_VxD, np.float64), FP32)
  close(dstate['table_VxD'][...], np.einsum('btv,btd->vd', onehot_BxTxV, ct_BxTxD), FP32)


def test_head_is_einsum(rng, seed):
  head = nn.Head(8, 13, rngs=nnx.Rngs(seed))
  x_BxTxD = normal(rng, 2, 3, 8)
  logits_BxTxV = head(x_BxTxD)
  assert logits_BxTxV.shape == (2, 3, 13)
  close(logits_BxTxV, np.asarray(x_BxTxD, np.float64) @ np.asarray(head.w_DxV[...], np.float64),
        FP32)
  assert nn.axes_of(head.w_DxV) == ('embed', 'vocab')
