"""nn.attend and its masks (causal, windows in steps or seconds, padding, segments, GQA)
against a per-query numpy loop; the cuDNN path run through XLA on CPU."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainscale import nn
from brainscale.nn import attention as attention_lib
from brainscale.nn.attention import Mask
from nn_helpers import FP32, FP32_DEEP, attend_ref_jnp, close, close_trees, mask_ref, normal


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
