"""Decoding frame-1 patches of a world model: the codes of queried patches given a context.

`decode_patches` chooses the codes of each queried patch from the model's
predictions, in parallel (each patch sees only the context) or sequentially (each
also sees the patches decoded before it), recomputing the sequence or through a KV
cache. counterfactual.py's probes are built on it.
"""

import jax
import jax.numpy as jnp

from brainscale import nn
from brainscale.cwm import sequence
from brainscale.cwm.model import WorldModel
from brainscale.cwm.sequence import CODES_PER_PATCH, TOKENS_PER_PATCH


def decode_patches(model: WorldModel, codes_BxFxhxw: jax.Array, context_BxC: jax.Array,
                   queries_BxQ: jax.Array, *, sequential: bool = False, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, teacher_BxQx4: jax.Array | None = None,
                   key: jax.Array | None = None, cached: bool = True):
  """Predicts the content codes of the `queries` patches after the `context` patches.

  Returns (tokens [B, Q, 4] chosen for conditioning, log-probs [B, Q, 4, codes]).
  Parallel: query k sees the context and its own earlier tokens (one shared
  prefix). Sequential: query k also sees queries 0..k-1 with their chosen tokens.
  Tokens are chosen by nn.choose (argmax at temperature 0, else sampled with
  top-k / top-p from `key`). `teacher` forces the conditioning tokens, so two runs
  on different inputs give comparable distributions. `cached` feeds the context
  once into a KV cache and then only the new tokens (4 Q token-passes in all);
  `cached=False` recomputes the whole sequence for every step (the reference).
  """
  key = jax.random.key(0) if key is None else key
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)

  def choose(logits_BxRxV, k, j):
    """The codes fed next: the teacher's, or chosen from the logits of step (patch k, code j)."""
    if teacher_BxQx4 is not None:
      r = logits_BxRxV.shape[1]
      return jax.lax.dynamic_slice_in_dim(teacher_BxQx4[..., j], k, r, 1)
    return nn.choose(logits_BxRxV, jax.random.fold_in(key, k * CODES_PER_PATCH + j), **sampling)

  decode = {(False, False): _parallel_recompute, (False, True): _parallel_cached,
            (True, False): _sequential_recompute, (True, True): _sequential_cached}
  return decode[sequential, cached](model, codes_BxFxhxw, context_BxC, queries_BxQ, choose)


def _parallel_recompute(model, codes_BxFxhxw, context_BxC, queries_BxQ, choose):
  seq, first_BxQ = _sequence(model, codes_BxFxhxw, context_BxC, queries_BxQ)
  b, c, q = first_BxQ.shape[0], context_BxC.shape[1], first_BxQ.shape[1]
  segments_BxL = jnp.concatenate([jnp.zeros((b, TOKENS_PER_PATCH * c), jnp.int32),
                                  jnp.repeat(jnp.arange(1, q + 1, dtype=jnp.int32),
                                             TOKENS_PER_PATCH)[None].repeat(b, 0)], 1)
  mask = nn.Mask(causal=True, q_segments_BxT=segments_BxL, kv_segments_BxS=segments_BxL,
                 shared_segment=0)
  tokens_BxL, chosen, logps = seq.tokens_BxL, [], []
  for j in range(CODES_PER_PATCH):
    tokens_BxL, c_BxQ, lp_BxQxV = _recompute_step(model, seq, tokens_BxL, first_BxQ + j, mask,
                                                  lambda logits: choose(logits, 0, j))
    chosen.append(c_BxQ)
    logps.append(lp_BxQxV)
  return jnp.stack(chosen, 2), jnp.stack(logps, 2)


def _sequential_recompute(model, codes_BxFxhxw, context_BxC, queries_BxQ, choose):
  seq, first_BxQ = _sequence(model, codes_BxFxhxw, context_BxC, queries_BxQ)
  b, q = first_BxQ.shape
  mask = nn.Mask(causal=True)

  def one_patch(k, carry):
    tokens_BxL, chosen_BxQx4, logp_BxQx4xV = carry
    for j in range(CODES_PER_PATCH):
      read_Bx1 = jax.lax.dynamic_slice_in_dim(first_BxQ, k, 1, 1) + j
      tokens_BxL, c_Bx1, lp_Bx1xV = _recompute_step(model, seq, tokens_BxL, read_Bx1, mask,
                                                    lambda logits: choose(logits, k, j))
      chosen_BxQx4 = chosen_BxQx4.at[:, k, j].set(c_Bx1[:, 0])
      logp_BxQx4xV = logp_BxQx4xV.at[:, k, j].set(lp_Bx1xV[:, 0])
    return tokens_BxL, chosen_BxQx4, logp_BxQx4xV

  init = (seq.tokens_BxL, jnp.zeros((b, q, CODES_PER_PATCH), jnp.int32),
          jnp.zeros((b, q, CODES_PER_PATCH, model.layout.codebook), jnp.float32))
  _, chosen_BxQx4, logp_BxQx4xV = jax.lax.fori_loop(0, q, one_patch, init)
  return chosen_BxQx4, logp_BxQx4xV


def _sequence(model, codes_BxFxhxw, context_BxC, queries_BxQ):
  """The context-then-queries sequence, and where each query's pointer sits [B, Q]."""
  b, c = context_BxC.shape
  q = queries_BxQ.shape[1]
  seq = sequence.build(codes_BxFxhxw, jnp.concatenate([context_BxC, queries_BxQ], 1),
                       model.layout)
  return seq, jnp.broadcast_to(TOKENS_PER_PATCH * (c + jnp.arange(q)), (b, q))


def _recompute_step(model, seq, tokens_BxL, read_BxR, mask, choose):
  """One whole pass: logits at `read` positions, the chosen code written after each."""
  x_BxLxD = model.features(tokens_BxL, seq.pos_BxLx3, mask)
  logits_BxRxV = model.content_logits(jnp.take_along_axis(x_BxLxD, read_BxR[..., None], 1))
  chosen_BxR = choose(logits_BxRxV)
  tokens_BxL = tokens_BxL.at[jnp.arange(tokens_BxL.shape[0])[:, None], read_BxR + 1].set(
      chosen_BxR)
  return tokens_BxL, chosen_BxR, jax.nn.log_softmax(logits_BxRxV, -1)


def _parallel_cached(model, codes_BxFxhxw, context_BxC, queries_BxQ, choose):
  """Prefill the context; then 4 steps of Q tokens, query k's tokens in segment k + 1."""
  b, c = context_BxC.shape
  q = queries_BxQ.shape[1]
  ctx = sequence.build(codes_BxFxhxw, context_BxC, model.layout)
  ask = sequence.build(codes_BxFxhxw, queries_BxQ, model.layout)
  tokens_BxQx5 = ask.tokens_BxL.reshape(b, q, TOKENS_PER_PATCH)
  pos_BxQx5x3 = ask.pos_BxLx3.reshape(b, q, TOKENS_PER_PATCH, 3)
  cache = model.init_cache(b, TOKENS_PER_PATCH * c + CODES_PER_PATCH * q)
  if c:
    _, cache = model.decode(ctx.tokens_BxL, ctx.pos_BxLx3, cache)
  segments_BxQ = jnp.broadcast_to(jnp.arange(1, q + 1, dtype=jnp.int32), (b, q))
  kv_segments_BxS = jnp.concatenate([jnp.zeros((b, TOKENS_PER_PATCH * c), jnp.int32),
                                     jnp.tile(segments_BxQ, (1, CODES_PER_PATCH))], 1)
  feed_BxQ, chosen, logps = tokens_BxQx5[..., 0], [], []
  for j in range(CODES_PER_PATCH):
    mask = nn.slot_mask(cache, q, b, q_segments_BxT=segments_BxQ,
                        kv_segments_BxS=kv_segments_BxS, shared_segment=0)
    x_BxQxD, cache = model.decode(feed_BxQ, pos_BxQx5x3[:, :, j], cache, mask)
    logits_BxQxV = model.content_logits(x_BxQxD)
    feed_BxQ = choose(logits_BxQxV, 0, j)
    chosen.append(feed_BxQ)
    logps.append(jax.nn.log_softmax(logits_BxQxV, -1))
  return jnp.stack(chosen, 2), jnp.stack(logps, 2)


def _sequential_cached(model, codes_BxFxhxw, context_BxC, queries_BxQ, choose):
  """Prefill all but the context's last token; then per patch: [last token, pointer],
  then its first three codes, one token each (4 steps per patch)."""
  b, c = context_BxC.shape
  q = queries_BxQ.shape[1]
  if c < 1:
    raise ValueError('sequential cached decoding needs at least one context patch')
  ctx = sequence.build(codes_BxFxhxw, context_BxC, model.layout)
  ask = sequence.build(codes_BxFxhxw, queries_BxQ, model.layout)
  tokens_BxQx5 = ask.tokens_BxL.reshape(b, q, TOKENS_PER_PATCH)
  pos_BxQx5x3 = ask.pos_BxLx3.reshape(b, q, TOKENS_PER_PATCH, 3)
  cache = model.init_cache(b, TOKENS_PER_PATCH * (c + q) - 1)
  _, cache = model.decode(ctx.tokens_BxL[:, :-1], ctx.pos_BxLx3[:, :-1], cache)

  def one_patch(k, carry):
    cache, last_Bx1, last_pos_Bx1x3, chosen_BxQx4, logp_BxQx4xV = carry
    here = lambda x: jax.lax.dynamic_index_in_dim(x, k, 1, keepdims=False)
    tokens_BxQx5_k, pos_Bx5x3 = here(tokens_BxQx5), here(pos_BxQx5x3)
    feed_BxT = jnp.concatenate([last_Bx1, tokens_BxQx5_k[:, :1]], 1)
    pos_BxTx3 = jnp.concatenate([last_pos_Bx1x3, pos_Bx5x3[:, :1]], 1)
    for j in range(CODES_PER_PATCH):
      x_BxTxD, cache = model.decode(feed_BxT, pos_BxTx3, cache)
      logits_Bx1xV = model.content_logits(x_BxTxD[:, -1:])
      feed_BxT = choose(logits_Bx1xV, k, j)
      pos_BxTx3 = pos_Bx5x3[:, j + 1:j + 2]
      chosen_BxQx4 = chosen_BxQx4.at[:, k, j].set(feed_BxT[:, 0])
      logp_BxQx4xV = logp_BxQx4xV.at[:, k, j].set(jax.nn.log_softmax(logits_Bx1xV, -1)[:, 0])
    return cache, feed_BxT, pos_BxTx3, chosen_BxQx4, logp_BxQx4xV

  init = (cache, ctx.tokens_BxL[:, -1:], ctx.pos_BxLx3[:, -1:],
          jnp.zeros((b, q, CODES_PER_PATCH), jnp.int32),
          jnp.zeros((b, q, CODES_PER_PATCH, model.layout.codebook), jnp.float32))
  _, _, _, chosen_BxQx4, logp_BxQx4xV = jax.lax.fori_loop(0, q, one_patch, init)
  return chosen_BxQx4, logp_BxQx4xV
