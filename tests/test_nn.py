"""Tests of brainscale.nn against naive references written here in numpy / plain jnp.

Every test draws its own random inputs from a seed derived from its node id
(`seed` / `rng` fixtures), so each test (and each parametrization) sees
different data, reproducibly. Computations run under module-level jitted
helpers so that compiled code is shared between tests (op-by-op dispatch
compiles every primitive separately and is several times slower on CPU).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from brainscale import nn
from brainscale.nn import attention as attention_lib
from brainscale.nn import embeddings as embeddings_lib
from brainscale.nn.attention import Mask

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


@jax.jit
def attend_vjp(q, k, v, mask, ct):
  out, vjp = jax.vjp(lambda *a: nn.attend(*a, mask), q, k, v)
  return out, vjp(ct)


cudnn_via_xla = jax.jit(functools.partial(attention_lib.attend_cudnn, implementation=None))


@jax.jit
def cudnn_via_xla_vjp(q, k, v, mask, ct):
  out, vjp = jax.vjp(lambda *a: cudnn_via_xla(*a, mask), q, k, v)
  return out, vjp(ct)


@jax.jit
def attend_ref_vjp(q, k, v, mask_BxTxS, ct):
  out, vjp = jax.vjp(lambda *a: attend_ref_jnp(*a, mask_BxTxS), q, k, v)
  return out, vjp(ct)


# ----------------------------------------------------------------------------- references

def rms_ref(x_xD, scale_D, eps=1e-6):
  x32 = x_xD.astype(jnp.float32)
  return x32 / jnp.sqrt(jnp.mean(x32 ** 2, axis=-1, keepdims=True) + eps) * scale_D


def rope_ref_np(x_BxTxNxH, angle_BxTxP):
  """Rotates pair (i, i + H/2) of every head by angle_BxTxP[b, t, i], one pair at a time."""
  x = np.asarray(x_BxTxNxH, np.float64)
  out = x.copy()
  b, t, n, h = x.shape
  for bi in range(b):
    for ti in range(t):
      for ni in range(n):
        for i in range(h // 2):
          a = angle_BxTxP[bi, ti, i]
          x1, x2 = x[bi, ti, ni, i], x[bi, ti, ni, i + h // 2]
          out[bi, ti, ni, i] = x1 * math.cos(a) - x2 * math.sin(a)
          out[bi, ti, ni, i + h // 2] = x2 * math.cos(a) + x1 * math.sin(a)
  return out


def angles_1d_np(t_BxT, head_dim, base):
  pairs = head_dim // 2
  t = np.asarray(t_BxT, np.float64)
  return np.stack([t * base ** (-i / pairs) for i in range(pairs)], axis=-1)


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


def attend_ref_np(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
  """Per batch, head and query loop; a query that sees nothing gives zeros."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  out_BxTxNxH = np.zeros((b, t, n, h))
  for bi in range(b):
    for ni in range(n):
      ki = ni // (n // kv)
      for ti in range(t):
        visible_S = mask_BxTxS[bi, ti]
        if not visible_S.any():
          continue
        logits_S = np.array([q[bi, ti, ni] @ k[bi, si, ki] for si in range(s)]) / math.sqrt(h)
        logits_S = np.where(visible_S, logits_S, -np.inf)
        p_S = np.exp(logits_S - logits_S.max())
        p_S /= p_S.sum()
        out_BxTxNxH[bi, ti, ni] = p_S @ v[bi, :, ki]
  return out_BxTxNxH


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


def gelu_tanh(x):
  return 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (x + 0.044715 * x ** 3)))


def mlp_manual(mod, x_BxTxD):
  if isinstance(mod, nn.GeluMLP):
    h = gelu_tanh(x_BxTxD @ mod.w_in_DxF[...])
  else:
    gate = x_BxTxD @ mod.w_gate_DxF[...]
    h = gate / (1 + jnp.exp(-gate)) * (x_BxTxD @ mod.w_up_DxF[...])
  return h @ mod.w_out_FxD[...]


def block_manual(blk, x_BxTxD, *, mask_BxTxS):
  normed = rms_ref(x_BxTxD, blk.attn_norm.scale_D[...])
  h = x_BxTxD + attention_manual(blk.attn, normed, None, mask_BxTxS=mask_BxTxS)
  return h + mlp_manual(blk.mlp, rms_ref(h, blk.mlp_norm.scale_D[...]))


def randomize_norms(module, rng):
  """Gives every RMSNorm in `module` a random scale (init is all ones)."""
  for _, m in nnx.iter_modules(module):
    if isinstance(m, nn.RMSNorm):
      m.scale_D[...] = normal(rng, *m.scale_D.shape)


# ----------------------------------------------------------------------------- core

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


# ----------------------------------------------------------------------------- rotary

@pytest.mark.parametrize('base', [10_000.0, 100.0])
def test_rope_1d_matches_pairwise_rotation(rng, base):
  t_BxT = jnp.asarray(rng.uniform(0, 50, (2, 3)), jnp.float32)
  x_BxTxNxH = normal(rng, 2, 3, 2, 8)
  out = nn.apply_rope(x_BxTxNxH, nn.rope_1d(t_BxT, 8, base=base))
  close(out, rope_ref_np(x_BxTxNxH, angles_1d_np(t_BxT, 8, base)), FP32_DEEP)


def test_apply_rope_grad_and_dtype(rng):
  rot = nn.rope_1d(jnp.asarray(rng.uniform(0, 20, (2, 4)), jnp.float32), 8)
  x_BxTxNxH, ct_BxTxNxH = normal(rng, 2, 4, 3, 8), normal(rng, 2, 4, 3, 8)
  close(jax.grad(lambda x: jnp.sum(nn.apply_rope(x, rot) * ct_BxTxNxH))(x_BxTxNxH),
        jax.grad(lambda x: jnp.sum(rope_rotate_jnp(x, rot) * ct_BxTxNxH))(x_BxTxNxH), FP32)
  x_bf16 = x_BxTxNxH.astype(jnp.bfloat16)
  out_bf16 = nn.apply_rope(x_bf16, rot)
  assert out_bf16.dtype == jnp.bfloat16
  close(out_bf16, rope_rotate_jnp(x_bf16.astype(jnp.float32), rot), BF16)


@pytest.mark.parametrize('integer_times', [True, False])
def test_rope_relative_position_invariance(rng, integer_times):
  q_H, k_H = normal(rng, 16), normal(rng, 16)
  a, b = rng.uniform(0, 30, 2)
  shift = rng.uniform(-20, 20)
  if integer_times:
    a, b, shift = round(a), round(b), round(shift)

  def score(ta, tb):
    rot = nn.rope_1d(jnp.asarray([[ta, tb]], jnp.float32), 16)
    q = nn.apply_rope(jnp.broadcast_to(q_H, (1, 2, 1, 16)), rot)[0, 0, 0]
    k = nn.apply_rope(jnp.broadcast_to(k_H, (1, 2, 1, 16)), rot)[0, 1, 0]
    return float(q @ k)

  # Depends on position (else this could not fail), but only through a - b.
  assert abs(score(a, b) - score(a + 3.7, b)) > 1e-3
  assert score(a, b) == pytest.approx(score(a + shift, b + shift), rel=1e-4, abs=1e-4)


def test_split_pairs():
  assert embeddings_lib.split_pairs(32, (6, 6, 4)) == (6, 6, 4)
  assert embeddings_lib.split_pairs(64, (6, 6, 4)) == (12, 12, 8)
  assert embeddings_lib.split_pairs(20, (6, 6, 4)) == (3, 3, 4)  # remainder goes last
  with pytest.raises(ValueError):
    embeddings_lib.split_pairs(4, (6, 6, 4))
  with pytest.raises(ValueError):
    nn.rope_1d(jnp.zeros((1, 2)), 7)
  with pytest.raises(ValueError):
    nn.rope_nd(jnp.zeros((1, 2, 2)), 32)


@pytest.mark.parametrize('axis', [0, 1, 2])
def test_rope_nd_single_axis_is_rope_1d_on_its_block(rng, axis):
  counts, offsets = (6, 6, 4), (0, 6, 12)
  pos_BxTxA = np.zeros((2, 5, 3), np.float32)
  pos_BxTxA[..., axis] = rng.uniform(-10, 10, (2, 5))
  rot = nn.rope_nd(jnp.asarray(pos_BxTxA), 32, split=(6, 6, 4))
  assert rot.cos_BxTxP.shape == (2, 5, 16)
  block = slice(offsets[axis], offsets[axis] + counts[axis])
  ref = nn.rope_1d(jnp.asarray(pos_BxTxA[..., axis]), 2 * counts[axis], base=100.0)
  close(rot.cos_BxTxP[..., block], ref.cos_BxTxP, FP32)
  close(rot.sin_BxTxP[..., block], ref.sin_BxTxP, FP32)
  others = np.ones(16, bool)
  others[block] = False
  np.testing.assert_array_equal(rot.cos_BxTxP[..., others], 1.0)
  np.testing.assert_array_equal(rot.sin_BxTxP[..., others], 0.0)


def test_rope_nd_apply_matches_pairwise_rotation(rng):
  pos_BxTxA = rng.uniform(0, 8, (2, 3, 3)).astype(np.float32)
  x_BxTxNxH = normal(rng, 2, 3, 2, 32)
  angle_BxTxP = np.concatenate([angles_1d_np(pos_BxTxA[..., a], 2 * c, 100.0)
                                for a, c in enumerate((6, 6, 4))], -1)
  out = nn.apply_rope(x_BxTxNxH, nn.rope_nd(jnp.asarray(pos_BxTxA), 32))
  close(out, rope_ref_np(x_BxTxNxH, angle_BxTxP), FP32_DEEP)


# ----------------------------------------------------------------------------- attend

def test_mask_dense_literal():
  causal_w2 = Mask(causal=True, window=2).dense(1, 4, 4)[0]
  np.testing.assert_array_equal(causal_w2, np.array(
      [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool))
  both_w2 = Mask(window=2).dense(1, 4, 4)[0]
  np.testing.assert_array_equal(both_w2, np.array(
      [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], bool))


def _times(rng, b, n):
  return np.cumsum(rng.uniform(0.05, 0.3, (b, n)), axis=1).astype(np.float32)


def _opt(a):
  return None if a is None else jnp.asarray(a)


def _case(name, rng, b):
  """(Mask, kwargs of mask_ref, T, S) for a named masking scenario."""
  t = s = 6
  if name == 'none':
    kw = {}
  elif name == 'causal':
    kw = dict(causal=True)
  elif name == 'causal_window3':
    kw = dict(causal=True, window=3)
  elif name == 'window3':
    kw = dict(window=3)
  elif name == 'padding':
    valid = rng.random((b, s)) < 0.6
    valid[:, 0] = True
    kw = dict(kv_valid=valid)
  elif name == 'causal_padding':
    kw = dict(causal=True, kv_valid=np.arange(s)[None] < rng.integers(1, s + 1, (b, 1)))
  elif name == 'segments':
    seg = np.sort(rng.integers(0, 3, (b, t)), axis=1)
    kw = dict(causal=True, q_seg=seg, kv_seg=seg)
  elif name == 'shared_prefix':  # segment 0 is a context every later segment sees
    seg = np.sort(rng.integers(0, 3, (b, t)), axis=1)
    kw = dict(causal=True, q_seg=seg, kv_seg=seg, shared=0)
  elif name == 'time_window':
    pos = _times(rng, b, t)
    kw = dict(causal=True, window=0.5, q_pos=pos, kv_pos=pos)
  elif name == 'cross':
    t, s = 4, 7
    kw = {}
  elif name == 'cross_time_window':
    t, s = 4, 7
    kw = dict(causal=True, window=0.5, q_pos=_times(rng, b, t), kv_pos=_times(rng, b, s))
  else:
    raise KeyError(name)
  mask = Mask(causal=kw.get('causal', False), window=kw.get('window'),
              q_pos_BxT=_opt(kw.get('q_pos')), kv_pos_BxS=_opt(kw.get('kv_pos')),
              kv_valid_BxS=_opt(kw.get('kv_valid')), q_segments_BxT=_opt(kw.get('q_seg')),
              kv_segments_BxS=_opt(kw.get('kv_seg')), shared_segment=kw.get('shared'))
  return mask, kw, t, s


CASES = ['none', 'causal', 'causal_window3', 'window3', 'padding', 'causal_padding',
         'segments', 'shared_prefix', 'time_window', 'cross', 'cross_time_window']


def _qkv(rng, b, t, s, n, kv, h, dtype=jnp.float32):
  return (normal(rng, b, t, n, h, dtype=dtype), normal(rng, b, s, kv, h, dtype=dtype),
          normal(rng, b, s, kv, h, dtype=dtype))


@pytest.mark.parametrize('case,kv_heads', [(c, 2) for c in CASES] + [
    (c, kv) for c in ('causal', 'padding', 'cross_time_window') for kv in (4, 1)])
def test_attend_xla_matches_reference(rng, case, kv_heads):
  """N=4 query heads share K=kv_heads key/value heads (GQA ratios 1, 2, 4)."""
  b, n, h = 2, 4, 8
  mask, kw, t, s = _case(case, rng, b)
  q, k, v = _qkv(rng, b, t, s, n, kv_heads, h)
  mask_BxTxS = mask_ref(b, t, s, **kw)
  np.testing.assert_array_equal(mask.dense(b, t, s), mask_BxTxS)
  ct_BxTxNxH = normal(rng, b, t, n, h)
  out_BxTxNxH, grads = attend_vjp(q, k, v, mask, ct_BxTxNxH)
  assert out_BxTxNxH.shape == (b, t, n, h)
  close(out_BxTxNxH, attend_ref_np(q, k, v, mask_BxTxS), FP32)
  _, grads_ref = attend_ref_vjp(q, k, v, mask_BxTxS, ct_BxTxNxH)
  close_trees(grads, grads_ref, FP32_DEEP)


def test_attend_fully_masked_rows_are_zero(rng):
  b, t, s, n, h = 2, 5, 5, 4, 8
  q, k, v = _qkv(rng, b, t, s, n, 2, h)
  valid = np.ones((b, s), bool)
  valid[1] = False                          # batch 1: every key is padding
  pos = _times(rng, b, t)
  kv_pos = pos.copy()
  kv_pos[0] += 10.0                         # batch 0: every key is in the future
  mask = Mask(causal=True, kv_valid_BxS=jnp.asarray(valid), q_pos_BxT=jnp.asarray(pos),
              kv_pos_BxS=jnp.asarray(kv_pos))
  assert not mask_ref(b, t, s, causal=True, kv_valid=valid, q_pos=pos, kv_pos=kv_pos).any()
  out, grads = attend_vjp(q, k, v, mask, normal(rng, b, t, n, h))
  np.testing.assert_array_equal(out, 0.0)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)
  # Only some rows masked: those are zero, the others are not.
  mask = Mask(causal=True, q_pos_BxT=jnp.asarray(pos), kv_pos_BxS=jnp.asarray(pos + 0.01))
  out = nn.attend(q, k, v, mask)
  np.testing.assert_array_equal(out[:, 0], 0.0)  # query 0 is before every key
  assert (np.abs(np.asarray(out[:, 1:])).sum(-1) > 0).all()
  close(out, attend_ref_np(q, k, v, mask_ref(b, t, s, causal=True, q_pos=pos,
                                             kv_pos=pos + 0.01)), FP32)


@pytest.mark.parametrize('case', ['causal', 'causal_window3', 'padding', 'causal_padding',
                                  'none', 'window3', 'cross'])
def test_attend_cudnn_via_xla_matches_reference(rng, case):
  b, n, h = 2, 4, 8
  mask, kw, t, s = _case(case, rng, b)
  q, k, v = _qkv(rng, b, t, s, n, 2, h)
  mask_BxTxS = mask_ref(b, t, s, **kw)
  ct_BxTxNxH = normal(rng, b, t, n, h)
  out, grads = cudnn_via_xla_vjp(q, k, v, mask, ct_BxTxNxH)
  close(out, attend_ref_np(q, k, v, mask_BxTxS), FP32)
  _, grads_ref = attend_ref_vjp(q, k, v, mask_BxTxS, ct_BxTxNxH)
  close_trees(grads, grads_ref, FP32_DEEP)


@pytest.mark.parametrize('t,s,causal,valid', [(7, 7, True, False), (7, 7, True, True),
                                              (5, 7, False, False), (7, 4, False, True)])
def test_attend_cudnn_via_xla_pads_odd_lengths(rng, t, s, causal, valid):
  """cuDNN trains only on even lengths: an odd T or S gets a padded row no query sees."""
  q, k, v = _qkv(rng, 2, t, s, 4, 2, 8)
  kv_valid = (np.arange(s)[None] < np.array([[s], [s - 2]])) if valid else None
  mask = Mask(causal=causal, kv_valid_BxS=None if kv_valid is None else jnp.asarray(kv_valid))
  mask_BxTxS = mask_ref(2, t, s, causal=causal, kv_valid=kv_valid)
  ct_BxTxNxH = normal(rng, 2, t, 4, 8)
  out, grads = cudnn_via_xla_vjp(q, k, v, mask, ct_BxTxNxH)
  assert out.shape == (2, t, 4, 8)
  close(out, attend_ref_np(q, k, v, mask_BxTxS), FP32)
  _, grads_ref = attend_ref_vjp(q, k, v, mask_BxTxS, ct_BxTxNxH)
  close_trees(grads, grads_ref, FP32_DEEP)


def test_attend_cudnn_via_xla_all_padding_row_is_zero(rng):
  q, k, v = _qkv(rng, 2, 4, 4, 2, 2, 8)
  valid = np.ones((2, 4), bool)
  valid[0] = False
  out = cudnn_via_xla(q, k, v, Mask(kv_valid_BxS=jnp.asarray(valid)))
  np.testing.assert_array_equal(out[0], 0.0)
  close(out[1], attend_ref_np(q, k, v, mask_ref(2, 4, 4, kv_valid=valid))[1], FP32)


@pytest.mark.parametrize('window', [2.5, 0.5, 1.0])
def test_attend_cudnn_fractional_window(rng, window):
  q, k, v = _qkv(rng, 1, 5, 5, 2, 2, 4)
  mask = Mask(causal=True, window=window)
  close(cudnn_via_xla(q, k, v, mask),
        attend_ref_np(q, k, v, mask_ref(1, 5, 5, causal=True, window=window)), FP32)


@pytest.mark.skipif(jax.devices()[0].platform == 'gpu', reason='checks the CPU error')
def test_attend_cudnn_backend_needs_gpu(rng):
  q, k, v = _qkv(rng, 1, 4, 4, 2, 2, 8)
  with pytest.raises(ValueError, match='needs a CUDA GPU'):
    nn.attend(q, k, v, Mask(causal=True), backend='cudnn')


def test_attend_rejects_bad_backend_and_heads(rng):
  q, k, v = _qkv(rng, 1, 4, 4, 4, 2, 8)
  with pytest.raises(ValueError, match='backend'):
    nn.attend(q, k, v, Mask(), backend='flash')
  q3, k3, v3 = _qkv(rng, 1, 4, 4, 4, 3, 8)
  with pytest.raises(ValueError, match='divide'):
    nn.attend(q3, k3, v3, Mask())


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


# ----------------------------------------------------------------------------- Block / Stack

@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
def test_block_matches_manual(rng, seed, mlp):
  blk = nn.Block(16, 4, 8, 32, num_kv_heads=2, mlp=mlp, qk_norm=True, rngs=nnx.Rngs(seed))
  randomize_norms(blk, rng)
  x_BxTxD = normal(rng, 2, 5, 16)
  graphdef, state = nnx.split(blk)
  # Values only: the gradients of Attention and the MLPs are checked above.
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


# ----------------------------------------------------------------------------- losses

def ce_ref_np(x_BxTxD, w_DxV, targets_BxT):
  logits = np.asarray(x_BxTxD, np.float64) @ np.asarray(w_DxV, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(logits, np.asarray(targets_BxT)[..., None], -1)[..., 0]


def _ce_inputs(rng, chunk, v=48, dtype=jnp.float32):
  x_BxTxD, w_DxV = normal(rng, 2, 5, 16, dtype=dtype), normal(rng, 16, v, dtype=dtype)
  targets = rng.integers(0, v, (2, 5))
  c = min(chunk, v)
  targets[0, :4] = [0, v - 1, c % v, c - 1]  # vocabulary and chunk boundaries
  return x_BxTxD, w_DxV, jnp.asarray(targets, jnp.int32)


def _full_ce(x, w, targets):
  return nn.cross_entropy(jnp.einsum('btd,dv->btv', x.astype(jnp.float32),
                                     w.astype(jnp.float32)), targets)


@functools.partial(jax.jit, static_argnames='chunk')
def chunked_ce_vjp(x, w, targets, ct, *, chunk):
  out, vjp = jax.vjp(lambda x, w: nn.chunked_cross_entropy(x, w, targets, chunk=chunk), x, w)
  return out, vjp(ct)


@jax.jit
def full_ce_vjp(x, w, targets, ct):
  out, vjp = jax.vjp(lambda x, w: _full_ce(x, w, targets), x, w)
  return out, vjp(ct)


@pytest.mark.parametrize('chunk', [8, 16, 48, 4096])
def test_chunked_ce_matches_full(rng, chunk):
  x_BxTxD, w_DxV, targets_BxT = _ce_inputs(rng, chunk)
  ct_BxT = normal(rng, 2, 5)
  nll_BxT, grads = chunked_ce_vjp(x_BxTxD, w_DxV, targets_BxT, ct_BxT, chunk=chunk)
  assert nll_BxT.shape == (2, 5) and nll_BxT.dtype == jnp.float32
  nll_ref_BxT, grads_ref = full_ce_vjp(x_BxTxD, w_DxV, targets_BxT, ct_BxT)
  close(nll_BxT, ce_ref_np(x_BxTxD, w_DxV, targets_BxT), FP32_DEEP)
  close(nll_ref_BxT, ce_ref_np(x_BxTxD, w_DxV, targets_BxT), FP32_DEEP)
  close_trees(grads, grads_ref, FP32_DEEP)


def test_chunked_ce_eager(rng):
  x_BxTxD, w_DxV, targets_BxT = _ce_inputs(rng, 16)
  close(nn.chunked_cross_entropy(x_BxTxD, w_DxV, targets_BxT, chunk=16),
        ce_ref_np(x_BxTxD, w_DxV, targets_BxT), FP32_DEEP)


def test_chunked_ce_chunk_must_divide_vocab(rng):
  x_BxTxD, w_DxV, targets_BxT = _ce_inputs(rng, 8)
  with pytest.raises(ValueError, match='multiple'):
    nn.chunked_cross_entropy(x_BxTxD, w_DxV, targets_BxT, chunk=20)


@pytest.mark.parametrize('chunk', [16, 48])
def test_chunked_ce_bf16(rng, chunk):
  """bf16 x, w: logits are exact in fp32, gradients are rounded to bf16 (BF16_LOSS)."""
  x_BxTxD, w_DxV, targets_BxT = _ce_inputs(rng, chunk, dtype=jnp.bfloat16)
  ct_BxT = normal(rng, 2, 5)
  nll_BxT, grads = chunked_ce_vjp(x_BxTxD, w_DxV, targets_BxT, ct_BxT, chunk=chunk)
  assert nll_BxT.dtype == jnp.float32
  assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
  x32, w32 = x_BxTxD.astype(jnp.float32), w_DxV.astype(jnp.float32)
  close(nll_BxT, ce_ref_np(x32, w32, targets_BxT), BF16_LOSS)
  _, grads_ref = full_ce_vjp(x32, w32, targets_BxT, ct_BxT)
  close_trees(grads, grads_ref, BF16_LOSS)


def test_chunked_ce_masked_targets_have_no_gradient(rng):
  x_BxTxD, w_DxV, targets_BxT = _ce_inputs(rng, 16)
  keep_BxT = rng.random((2, 5)) < 0.5
  keep_BxT[0, 0], keep_BxT[1, 1] = True, False
  ct_BxT = jnp.asarray(keep_BxT, jnp.float32) / keep_BxT.sum()  # grad of the masked mean
  _, (dx, dw) = chunked_ce_vjp(x_BxTxD, w_DxV, targets_BxT, ct_BxT, chunk=16)
  loss = lambda x, w: nn.masked_mean(nn.chunked_cross_entropy(x, w, targets_BxT, chunk=16),
                                     jnp.asarray(keep_BxT))
  close_trees(jax.grad(loss, (0, 1))(x_BxTxD, w_DxV), (dx, dw), FP32)
  np.testing.assert_array_equal(np.asarray(dx)[~keep_BxT], 0.0)
  assert np.abs(np.asarray(dx)[keep_BxT]).sum(-1).min() > 0
  # Changing the masked targets changes nothing.
  other = jnp.asarray(np.where(keep_BxT, targets_BxT, (np.asarray(targets_BxT) + 7) % 48),
                      jnp.int32)
  close_trees(chunked_ce_vjp(x_BxTxD, w_DxV, other, ct_BxT, chunk=16)[1], (dx, dw), EXACT)
  # dw equals the gradient of the kept tokens alone.
  xk, tk = x_BxTxD[keep_BxT], targets_BxT[keep_BxT]
  dw_ref = jax.grad(lambda w: _full_ce(xk[None], w, tk[None]).mean())(w_DxV)
  close(dw, dw_ref, FP32_DEEP)


def poisson_ref_np(rate, counts, mask, full, eps=1e-8):
  rate, counts = np.asarray(rate, np.float64), np.asarray(counts, np.float64)
  nll = rate - counts * np.log(rate + eps)
  if full:
    nll = nll + np.vectorize(lambda c: math.lgamma(c + 1))(counts)
  if mask is None:
    return nll.mean()
  m = np.broadcast_to(np.asarray(mask, np.float64), nll.shape)
  return (nll * m).sum() / max(m.sum(), 1.0)


@pytest.mark.parametrize('full', [False, True])
@pytest.mark.parametrize('masked', [False, True])
def test_poisson_nll(rng, full, masked):
  rate_BxTxC = jnp.asarray(rng.uniform(0.1, 5, (2, 6, 3)), jnp.float32)
  counts_BxTxC = jnp.asarray(rng.poisson(np.asarray(rate_BxTxC)), jnp.int32)
  mask = jnp.asarray(rng.random((2, 6, 1)) < 0.6) if masked else None
  value, grad = jax.value_and_grad(lambda r: nn.poisson_nll(r, counts_BxTxC, mask, full=full))(
      rate_BxTxC)
  close(value, poisson_ref_np(rate_BxTxC, counts_BxTxC, mask, full), FP32)
  m = np.ones((2, 6, 3)) if mask is None else np.broadcast_to(np.asarray(mask), (2, 6, 3))
  grad_ref = (1 - np.asarray(counts_BxTxC) / (np.asarray(rate_BxTxC, np.float64) + 1e-8)) * m
  close(grad, grad_ref / max(m.sum(), 1.0), FP32)


@pytest.mark.parametrize('masked', [False, True])
def test_masked_mse(rng, masked):
  pred, target = normal(rng, 3, 4, 2), normal(rng, 3, 4, 2, dtype=jnp.bfloat16)
  mask = rng.random((3, 4, 1)) < 0.5 if masked else None
  diff2 = (np.asarray(pred, np.float64) - np.asarray(target.astype(jnp.float32))) ** 2
  if masked:
    m = np.broadcast_to(mask, diff2.shape)
    expected = diff2[m].mean() if m.any() else 0.0
  else:
    expected = diff2.mean()
  close(nn.masked_mse(pred, target, None if mask is None else jnp.asarray(mask)), expected,
        FP32)


def test_masked_mean_empty_mask_is_zero(rng):
  values = normal(rng, 4, 3)
  assert float(nn.masked_mean(values, jnp.zeros((4, 3), bool))) == 0.0
  assert float(nn.masked_mse(values, values + 1, jnp.zeros((4, 1), bool))) == 0.0
  close(nn.masked_mean(values, None), np.asarray(values).mean(), FP32)
  # a metric with nothing to measure says so, and its gradient stays finite
  assert np.isnan(float(nn.masked_mean(values, jnp.zeros((4, 3), bool), empty=jnp.nan)))
  assert np.isnan(float(nn.poisson_nll(values + 5, values, jnp.zeros((4, 3), bool),
                                       empty=jnp.nan)))
  grad = jax.grad(lambda v: nn.masked_mean(v, jnp.zeros((4, 3), bool), empty=jnp.nan))(values)
  assert np.all(np.asarray(grad) == 0)


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


def test_chunked_ce_never_holds_the_full_logits():
  """XLA's memory plan for loss + gradients: the naive loss holds N x V fp32 logits
  (64 MiB here), the chunked one about N x chunk (4 MiB) plus the fp32 dW."""
  n, d, v, chunk = 1024, 64, 16384, 1024
  args = (jax.ShapeDtypeStruct((1, n, d), jnp.float32),
          jax.ShapeDtypeStruct((d, v), jnp.float32), jax.ShapeDtypeStruct((1, n), jnp.int32))

  def temp_bytes(loss):
    grad = jax.jit(jax.grad(lambda x, w, t: loss(x, w, t).mean(), argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  logits = n * v * 4
  naive = temp_bytes(_full_ce)
  chunked = temp_bytes(functools.partial(nn.chunked_cross_entropy, chunk=chunk))
  assert naive >= logits, (naive, logits)
  assert chunked <= logits / 4, (chunked, logits)
