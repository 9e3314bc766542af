"""Shared by the tests/test_nn_*.py modules: tolerances, jitted runners, plain references.

Tests draw their own random inputs from a seed derived from their node id (`seed` / `rng`
fixtures), so each test (and each parametrization) sees different data, reproducibly.
Computations run under the module-level jitted runners here so that compiled code is shared
between tests (op-by-op dispatch compiles every primitive separately and is several times
slower on CPU).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from brainscale import nn

# Tolerances, per dtype and kind of computation.
FP32 = dict(rtol=1e-5, atol=1e-5)        # one fp32 op chain vs a float64/fp32 reference
FP32_DEEP = dict(rtol=1e-4, atol=2e-5)   # several layers / scans / gradients of them
BF16 = dict(rtol=2e-2, atol=2e-2)        # bf16 outputs (8 mantissa bits: ~4e-3 relative)
BF16_LOSS = dict(rtol=2e-2, atol=3e-2)   # chunked CE, bf16 x and w: grads rounded to bf16
EXACT = dict(rtol=0, atol=0)


def normal(rng, *shape, dtype=jnp.float32, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def close(actual, expected, tol):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             **tol)


def close_trees(actual, expected, tol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    close(a, e, tol)


# ----------------------------------------------------------------------------- jitted runners

def call(module, *args, **kwargs):
  return module(*args, **kwargs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def run(fn, graphdef, state, args, kwargs):
  """fn(module, *args, **kwargs) with the module rebuilt from (graphdef, state)."""
  return fn(nnx.merge(graphdef, state), *args, **kwargs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def run_vjp(fn, graphdef, state, args, kwargs, ct):
  """fn's output and the gradient of sum(out * ct) w.r.t. (state, args)."""
  out, vjp = jax.vjp(lambda s, a: fn(nnx.merge(graphdef, s), *a, **kwargs), state, args)
  return out, vjp(ct)


# ----------------------------------------------------------------------------- references

def rope_rotate_jnp(x_BxTxNxH, rot):
  """x * cos + rotate_half(x) * sin, with the angles duplicated over both halves."""
  h = x_BxTxNxH.shape[-1]
  cos = jnp.concatenate([rot.cos_BxTxP] * 2, -1)[:, :, None]
  sin = jnp.concatenate([rot.sin_BxTxP] * 2, -1)[:, :, None]
  rotated = jnp.concatenate([-x_BxTxNxH[..., h // 2:], x_BxTxNxH[..., :h // 2]], -1)
  return x_BxTxNxH * cos + rotated * sin


def mask_ref(b, t, s, *, causal=False, window=None, q_pos=None, kv_pos=None, kv_valid=None,
             q_seg=None, kv_seg=None, shared=None):
  """[B, T, S] boolean mask built key by key from the Mask docstring."""
  mask_BxTxS = np.zeros((b, t, s), bool)
  for bi in range(b):
    for ti in range(t):
      for si in range(s):
        # Positions in float32 like the module, so boundary comparisons agree exactly.
        qp = np.float32(ti if q_pos is None else q_pos[bi, ti])
        kp = np.float32(si if kv_pos is None else kv_pos[bi, si])
        d = qp - kp
        ok = True
        if causal:
          ok = ok and d >= 0
        if window is not None:
          ok = ok and (d < window if causal else abs(d) < window)
        if kv_valid is not None:
          ok = ok and bool(kv_valid[bi, si])
        if q_seg is not None:
          ok = ok and (q_seg[bi, ti] == kv_seg[bi, si] or kv_seg[bi, si] == shared)
        mask_BxTxS[bi, ti, si] = ok
  return mask_BxTxS


def attend_ref_jnp(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
  """Differentiable reference: KV heads repeated to N, dense masked softmax."""
  g = q_BxTxNxH.shape[2] // k_BxSxKxH.shape[2]
  k_BxSxNxH = jnp.repeat(k_BxSxKxH, g, axis=2)
  v_BxSxNxH = jnp.repeat(v_BxSxKxH, g, axis=2)
  logits_BxNxTxS = jnp.einsum('btnh,bsnh->bnts', q_BxTxNxH, k_BxSxNxH) / math.sqrt(
      q_BxTxNxH.shape[-1])
  m_Bx1xTxS = jnp.asarray(mask_BxTxS)[:, None]
  p_BxNxTxS = jnp.where(m_Bx1xTxS, jax.nn.softmax(jnp.where(m_Bx1xTxS, logits_BxNxTxS, -1e9)),
                        0.0)
  return jnp.einsum('bnts,bsnh->btnh', p_BxNxTxS, v_BxSxNxH)


def gelu_tanh(x):
  return 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (x + 0.044715 * x ** 3)))


def mlp_manual(mod, x_BxTxD):
  if isinstance(mod, nn.GeluMLP):
    h = gelu_tanh(x_BxTxD @ mod.w_in_DxF[...])
  else:
    gate = x_BxTxD @ mod.w_gate_DxF[...]
    h = gate / (1 + jnp.exp(-gate)) * (x_BxTxD @ mod.w_up_DxF[...])
  return h @ mod.w_out_FxD[...]
