"""Losses in brainscale.nn: chunked cross-entropy (values, gradients, masks, bf16, memory),
Poisson NLL, masked MSE and mean, against float64 numpy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainscale import nn
from nn_helpers import BF16_LOSS, EXACT, FP32, FP32_DEEP, close, close_trees, normal


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
