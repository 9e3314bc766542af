"""Losses: softmax cross-entropy in vocabulary chunks, Poisson NLL, masked MSE.

`chunked_cross_entropy` never holds more than N x chunk logits: the forward
keeps a running log-sum-exp over vocabulary chunks, and its custom VJP
recomputes each chunk's logits to form the gradient chunk by chunk.
"""

import functools

import jax
import jax.numpy as jnp

from brainscale import parallel
from brainscale.parallel import ACT_EMBED, ACT_LENGTH, BATCH


def masked_mean(values: jax.Array, mask: jax.Array | None, *, empty: float = 0.0) -> jax.Array:
  """Mean of `values` where `mask` is true (`empty` when nothing is: 0 for a loss term,
  NaN for a metric that had nothing to measure)."""
  values = values.astype(jnp.float32)
  if mask is None:
    return values.mean()
  mask = jnp.broadcast_to(mask, values.shape).astype(jnp.float32)
  count = mask.sum()
  return jnp.where(count > 0, (values * mask).sum() / jnp.maximum(count, 1.0), empty)


def _chunk(w_DxV: jax.Array, c, size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(w_DxV, c * size, size, axis=1)


# Tokens stay split as the batch and the residual stream's length are, so no device
# computes another's logits.
TOKENS = (BATCH, ACT_LENGTH)


def _chunk_logits(x_NxD, w_DxV, c, size):
  logits_NxC = jnp.dot(x_NxD, _chunk(w_DxV, c, size), preferred_element_type=jnp.float32)
  return parallel.constrain(logits_NxC, (TOKENS, None))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nll(x_NxD, w_DxV, targets_N, chunk):
  return _nll_fwd(x_NxD, w_DxV, targets_N, chunk)[0]


def _nll_fwd(x_NxD, w_DxV, targets_N, chunk):
  n, v = x_NxD.shape[0], w_DxV.shape[1]

  def body(carry, c):
    max_N, sum_N, target_N = carry
    logits_NxC = _chunk_logits(x_NxD, w_DxV, c, chunk)
    new_max_N = jnp.maximum(max_N, logits_NxC.max(-1))
    sum_N = sum_N * jnp.exp(max_N - new_max_N) + jnp.exp(
        logits_NxC - new_max_N[:, None]).sum(-1)
    local_N = targets_N - c * chunk
    here_N = (local_N >= 0) & (local_N < chunk)
    picked_N = jnp.take_along_axis(logits_NxC, jnp.clip(local_N, 0, chunk - 1)[:, None],
                                   axis=-1)[:, 0]
    target_N = jnp.where(here_N, picked_N, target_N)
    return (new_max_N, sum_N, target_N), None

  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
          jnp.zeros((n,), jnp.float32))
  (max_N, sum_N, target_N), _ = jax.lax.scan(body, init, jnp.arange(v // chunk))
  lse_N = max_N + jnp.log(sum_N)
  return lse_N - target_N, (x_NxD, w_DxV, targets_N, lse_N)


def _nll_bwd(chunk, residuals, g_N):
  x_NxD, w_DxV, targets_N, lse_N = residuals

  def body(carry, c):
    dx_NxD, dw_DxV = carry
    logits_NxC = _chunk_logits(x_NxD, w_DxV, c, chunk)
    probs_NxC = jnp.exp(logits_NxC - lse_N[:, None])
    onehot_NxC = jax.nn.one_hot(targets_N - c * chunk, chunk, dtype=jnp.float32)
    dlogits_NxC = ((probs_NxC - onehot_NxC) * g_N[:, None]).astype(x_NxD.dtype)
    dx_NxD += jnp.dot(dlogits_NxC, _chunk(w_DxV, c, chunk).T,
                      preferred_element_type=jnp.float32)
    dw_DxC = jnp.dot(x_NxD.T, dlogits_NxC, preferred_element_type=jnp.float32)
    dw_DxV = jax.lax.dynamic_update_slice_in_dim(dw_DxV, dw_DxC.astype(dw_DxV.dtype),
                                                 c * chunk, axis=1)
    return (dx_NxD, dw_DxV), None

  # Each dW chunk is written once, so dW is held in w's dtype: no fp32 [D, V] buffer.
  init = (jnp.zeros(x_NxD.shape, jnp.float32), jnp.zeros(w_DxV.shape, w_DxV.dtype))
  (dx_NxD, dw_DxV), _ = jax.lax.scan(body, init, jnp.arange(w_DxV.shape[1] // chunk))
  return dx_NxD.astype(x_NxD.dtype), dw_DxV, None


_nll.defvjp(_nll_fwd, _nll_bwd)


def chunked_cross_entropy(x_BxTxD: jax.Array, w_DxV: jax.Array, targets_BxT: jax.Array,
                          *, chunk: int = 8192) -> jax.Array:
  """Per-token -log softmax(x @ w)[target], computed `chunk` vocabulary entries at a time.

  Returns [B, T] float32. `chunk` is clipped to V; V must be a multiple of it.
  """
  *lead, d = x_BxTxD.shape
  v = w_DxV.shape[1]
  chunk = min(chunk, v)
  if v % chunk:
    raise ValueError(f'vocabulary {v} is not a multiple of the loss chunk {chunk}; '
                     f'pad the vocabulary or pick a divisor')
  x_NxD = parallel.constrain(x_BxTxD.reshape(-1, d), (TOKENS, ACT_EMBED))
  nll_N = _nll(x_NxD, w_DxV, targets_BxT.reshape(-1).astype(jnp.int32), chunk)
  return nll_N.reshape(lead)


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Per-token cross-entropy from full logits (the reference for the chunked one)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def poisson_nll(rate: jax.Array, counts: jax.Array, mask: jax.Array | None = None, *,
                eps: float = 1e-8, full: bool = False, empty: float = 0.0) -> jax.Array:
  """Mean Poisson negative log-likelihood of `counts` under `rate` (> 0); `empty` where the
  mask is all false (as masked_mean).

  Drops the log(counts!) constant unless `full`.
  """
  rate = rate.astype(jnp.float32)
  counts = counts.astype(jnp.float32)
  nll = rate - counts * jnp.log(rate + eps)
  if full:
    nll += jax.scipy.special.gammaln(counts + 1.0)
  return masked_mean(nll, mask, empty=empty)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean squared error over the entries where `mask` is true."""
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  return masked_mean(diff * diff, mask)
