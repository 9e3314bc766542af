"""Multi-head self- and cross-attention with GQA, QK-norm and structured masks.

A `Mask` describes which keys a query sees (causal, sliding window over
positions, padding, segments) without materialising it, so each backend can
use its fastest form: `xla` builds the boolean mask (the reference), `cudnn`
calls jax.nn.dot_product_attention's fused kernel, `pallas` calls
kernels.flash_attention.

For decoding, a `KVCache` holds every layer's keys and values by slot: a
prefix is fed once, then new tokens are fed against it (one or a few at a time,
at any positions). The caller's Mask speaks of slot indices (`slot_mask`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from brainscale import parallel
from brainscale.nn.core import RMSNorm, param
from brainscale.nn.embeddings import Rotary, apply_rope
from brainscale.parallel import ACT_HEADS, BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LENGTH


@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query attends to.

  causal: key position <= query position. window: additionally
  query position - key position < window (positions default to token index;
  pass times for a window in time units, e.g. Enigma's samples). kv_valid: False marks key padding.
  Segments: a query sees only keys of its own segment id, and keys of
  `shared_segment` when set (a shared prefix that many independent
  continuations attend to, e.g. one context and many parallel queries).
  """
  causal: bool = False
  window: float | None = None
  q_pos_BxT: jax.Array | None = None
  kv_pos_BxS: jax.Array | None = None
  kv_valid_BxS: jax.Array | None = None
  q_segments_BxT: jax.Array | None = None
  kv_segments_BxS: jax.Array | None = None
  shared_segment: int | None = None

  @property
  def is_plain(self) -> bool:
    """Only causal/window over token indices (what fused kernels take as flags)."""
    return all(a is None for a in (self.q_pos_BxT, self.kv_pos_BxS, self.kv_valid_BxS,
                                   self.q_segments_BxT, self.kv_segments_BxS))

  def dense(self, batch: int, t: int, s: int) -> jax.Array | None:
    """The boolean mask [B, T, S], or None when every key is visible."""
    q_pos = jnp.arange(t)[None] if self.q_pos_BxT is None else self.q_pos_BxT
    kv_pos = jnp.arange(s)[None] if self.kv_pos_BxS is None else self.kv_pos_BxS
    mask = jnp.ones((batch, t, s), bool)
    delta_BxTxS = q_pos[:, :, None] - kv_pos[:, None, :]
    if self.causal:
      mask &= delta_BxTxS >= 0
    if self.window is not None:
      mask &= delta_BxTxS < self.window
      if not self.causal:
        mask &= delta_BxTxS > -self.window
    if self.kv_valid_BxS is not None:
      mask &= self.kv_valid_BxS[:, None, :]
    if self.q_segments_BxT is not None:
      same_BxTxS = self.q_segments_BxT[:, :, None] == self.kv_segments_BxS[:, None, :]
      if self.shared_segment is not None:
        same_BxTxS |= (self.kv_segments_BxS == self.shared_segment)[:, None, :]
      mask &= same_BxTxS
    return mask


jax.tree_util.register_dataclass(
    Mask, meta_fields=['causal', 'window', 'shared_segment'],
    data_fields=['q_pos_BxT', 'kv_pos_BxS', 'kv_valid_BxS', 'q_segments_BxT', 'kv_segments_BxS'])


@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of L layers at S slots: slot s holds the s-th token fed.

  Keys are stored after QK-norm and rotary, as attention used them. `length`
  slots are filled; `layer` is the layer a Stack is at while it runs.
  """
  k_LxBxSxKxH: jax.Array
  v_LxBxSxKxH: jax.Array
  length: jax.Array                  # int32 []
  layer: jax.Array                   # int32 []

  @classmethod
  def zeros(cls, layers: int, batch: int, slots: int, kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> 'KVCache':
    k = jnp.zeros((layers, batch, slots, kv_heads, head_dim), dtype)
    k = parallel.constrain(k, CACHE_AXES)
    return cls(k, k, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  @property
  def slots(self) -> int:
    return self.k_LxBxSxKxH.shape[2]

  def repeat(self, n: int) -> 'KVCache':
    """Each batch row n times (b0, b0, ..., b1, ...): many continuations of one prefix."""
    grow = lambda x: parallel.constrain(jnp.repeat(x, n, axis=1), CACHE_AXES)
    return KVCache(grow(self.k_LxBxSxKxH), grow(self.v_LxBxSxKxH), self.length, self.layer)

  def bytes(self) -> int:
    return 2 * self.k_LxBxSxKxH.size * self.k_LxBxSxKxH.dtype.itemsize


CACHE_AXES = (None, BATCH, None, ACT_HEADS, None)

jax.tree_util.register_dataclass(
    KVCache, data_fields=['k_LxBxSxKxH', 'v_LxBxSxKxH', 'length', 'layer'], meta_fields=[])


def slot_mask(cache: KVCache, tokens: int, batch: int, *, q_segments_BxT=None,
              kv_segments_BxS=None, shared_segment: int | None = None) -> Mask:
  """Causal over cache slots for `tokens` new tokens fed at slots length, length + 1, ...

  A new token sees the filled slots and the new tokens before it (never the empty
  slots after them); segments narrow that further (parallel continuations of one
  shared prefix, as in Mask).
  """
  q_pos_BxT = jnp.broadcast_to(cache.length + jnp.arange(tokens), (batch, tokens))
  kv_pos_BxS = jnp.broadcast_to(jnp.arange(cache.slots), (batch, cache.slots))
  return Mask(causal=True, q_pos_BxT=q_pos_BxT, kv_pos_BxS=kv_pos_BxS,
              q_segments_BxT=q_segments_BxT, kv_segments_BxS=kv_segments_BxS,
              shared_segment=shared_segment)


def attend_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask) -> jax.Array:
  """Reference softmax attention; K heads are shared by N // K query heads."""
  b, t, n, h = q_BxTxNxH.shape
  s, kv = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv, n // kv, h)
  logits_BxKxGxTxS = jnp.einsum('btkgh,bskh->bkgts', q_BxTxKxGxH, k_BxSxKxH,
                                preferred_element_type=jnp.float32) * h ** -0.5
  mask_BxTxS = mask.dense(b, t, s)
  logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, -1e30)
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1)
  # A query that sees no key (e.g. all padding) returns zeros, not a mean of values.
  probs = jnp.where(mask_BxTxS.any(-1)[:, None, None, :, None], probs, 0.0)
  out_BxTxKxGxH = jnp.einsum('bkgts,bskh->btkgh', probs.astype(v_BxSxKxH.dtype), v_BxSxKxH)
  return out_BxTxKxGxH.reshape(b, t, n, h)


def attend_cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask, *,
                 implementation: str | None = 'cudnn') -> jax.Array:
  """jax.nn.dot_product_attention; cuDNN's fused kernel on GPU (bf16/fp16 inputs).

  A plain causal/window mask goes in as flags, anything else as a dense mask.
  cuDNN trains only on even lengths, so an odd T or S gets one more row: a padded
  key no query sees (by key length, or False in the dense mask), a padded query
  whose output is dropped. `implementation=None` runs the same call through XLA
  (for CPU tests).
  """
  if implementation == 'cudnn' and parallel.platform() != 'gpu':
    raise ValueError(f"attention backend 'cudnn' needs a CUDA GPU; this process has "
                     f"{parallel.platform()}. Use --config.model.attention=xla")
  if implementation == 'cudnn' and q_BxTxNxH.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention backend 'cudnn' takes bfloat16 or float16, not "
                     f"{q_BxTxNxH.dtype}: set --config.model.compute_dtype=bfloat16, or use "
                     "attention=pallas")
  b, t, s = q_BxTxNxH.shape[0], q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
  t_even, s_even = t + t % 2, s + s % 2
  rows = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  q, k, v = rows(q_BxTxNxH, t_even), rows(k_BxSxKxH, s_even), rows(v_BxSxKxH, s_even)
  # Integer distances d < window are d <= ceil(window) - 1 keys back.
  left = None if mask.window is None else math.ceil(mask.window) - 1
  if mask.is_plain and (left is None or (mask.causal and left >= 0)):
    window = None if left is None else (left, 0)
    lengths = {} if s == s_even else {'key_value_seq_lengths': jnp.full((b,), s, jnp.int32)}
    out = jax.nn.dot_product_attention(q, k, v, is_causal=mask.causal, local_window_size=window,
                                       implementation=implementation, **lengths)
    return out[:, :t]
  mask_BxTxS = jnp.pad(mask.dense(b, t, s), ((0, 0), (0, t_even - t), (0, s_even - s)))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask_BxTxS[:, None],
                                     implementation=implementation)[:, :t]
  return jnp.where(mask_BxTxS[:, :t].any(-1)[..., None, None], out, 0)


def attend_pallas(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask) -> jax.Array:
  """Flash attention from kernels/ (Pallas fwd + bwd; interpreted off GPU)."""
  from kernels import flash_attention  # noqa: PLC0415  (kernels import no brainscale)
  interpret = parallel.platform() != 'gpu'
  return flash_attention.attention(
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, causal=mask.causal, window=mask.window,
      shared_segment=mask.shared_segment, interpret=interpret,
      **{name: getattr(mask, name) for name in _MASK_ARRAYS if getattr(mask, name) is not None})


_MASK_ARRAYS = ('q_pos_BxT', 'kv_pos_BxS', 'kv_valid_BxS', 'q_segments_BxT', 'kv_segments_BxS')


def per_device(attend_fn):
  """`attend_fn` run on each device's own batch rows and heads under a mesh (shard_map).

  For fused kernels: a pallas_call is opaque to XLA's partitioner, which would gather
  whole arrays onto every device, and cuDNN's partitioner wants q, k and v sharded
  alike. Mask arrays are split by batch row; the K key/value heads as the N query heads.
  """
  def run(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask) -> jax.Array:
    b, t, s = q_BxTxNxH.shape[0], q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
    arrays = {name: jnp.broadcast_to(getattr(mask, name), (b, t if name.startswith('q_') else s))
              for name in _MASK_ARRAYS if getattr(mask, name) is not None}
    flags = dict(causal=mask.causal, window=mask.window, shared_segment=mask.shared_segment)

    def local(q, k, v, arrays):
      return attend_fn(q, k, v, Mask(**flags, **arrays))

    heads = (BATCH, None, ACT_HEADS, None)
    rows = {name: (BATCH, None) for name in arrays}
    sharded = parallel.shard_local(local, (heads, heads, heads, rows), heads,
                                   (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, arrays))
    return sharded(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, arrays)

  return run


BACKENDS = {'xla': attend_xla, 'cudnn': per_device(attend_cudnn),
            'pallas': per_device(attend_pallas)}


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask, backend: str = 'xla') -> jax.Array:
  if backend not in BACKENDS:
    raise ValueError(f'attention backend {backend!r}; expected one of {sorted(BACKENDS)}')
  n, kv = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
  if n % kv:
    raise ValueError(f'{n} query heads do not divide into {kv} key/value heads')
  return BACKENDS[backend](q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)


class Attention(nnx.Module):
  """Self-attention (`kv_BxSxE=None`) or cross-attention; no biases."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, num_kv_heads: int = 0,
               kv_dim: int = 0, qk_norm: bool = False, backend: str = 'xla',
               rngs: nnx.Rngs):
    num_kv_heads = num_kv_heads or num_heads
    kv_dim = kv_dim or dim
    self.w_q_DxNxH = param(rngs, (dim, num_heads, head_dim), (EMBED, HEADS, HEAD_DIM))
    self.w_k_ExKxH = param(rngs, (kv_dim, num_kv_heads, head_dim),
                           (EMBED, KV_HEADS, HEAD_DIM))
    self.w_v_ExKxH = param(rngs, (kv_dim, num_kv_heads, head_dim),
                           (EMBED, KV_HEADS, HEAD_DIM))
    self.w_o_NxHxD = param(rngs, (num_heads, head_dim, dim), (HEADS, HEAD_DIM, EMBED),
                           fan_in=num_heads * head_dim)
    self.q_norm = RMSNorm(head_dim, axis_name=HEAD_DIM, rngs=rngs) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, axis_name=HEAD_DIM, rngs=rngs) if qk_norm else None
    self.backend = backend

  def __call__(self, x_BxTxD: jax.Array, kv_BxSxE: jax.Array | None = None, *,
               mask: Mask = Mask(), rope_q: Rotary | None = None,
               rope_k: Rotary | None = None, cache: KVCache | None = None):
    """Attention output [B, T, D]; with a cache (self-attention), (output, cache with the
    T new keys and values written at slots length..length+T-1 of `cache.layer`)."""
    if cache is not None and kv_BxSxE is not None:
      raise ValueError('a KV cache is for self-attention; cross-attention keys do not grow')
    kv_BxSxE = x_BxTxD if kv_BxSxE is None else kv_BxSxE
    q_BxTxNxH = jnp.einsum('btd,dnh->btnh', x_BxTxD, self.w_q_DxNxH[...])
    k_BxSxKxH = jnp.einsum('bse,ekh->bskh', kv_BxSxE, self.w_k_ExKxH[...])
    v_BxSxKxH = jnp.einsum('bse,ekh->bskh', kv_BxSxE, self.w_v_ExKxH[...])
    if self.q_norm is not None:
      q_BxTxNxH, k_BxSxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxSxKxH)
    if rope_q is not None:
      q_BxTxNxH = apply_rope(q_BxTxNxH, rope_q)
    if rope_k is not None:
      k_BxSxKxH = apply_rope(k_BxSxKxH, rope_k)
    # Heads split over the tensor axis, the whole sequence on each device (Megatron): the
    # residual stream is gathered along its length here, never the weights.
    heads = (BATCH, LENGTH, ACT_HEADS, None)
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = (parallel.constrain(a, heads)
                                       for a in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = (checkpoint_name(a, 'qkv')
                                       for a in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
    if cache is not None:
      cache, k_BxSxKxH, v_BxSxKxH = _write(cache, k_BxSxKxH, v_BxSxKxH)
    # Decoding attends with the XLA reference: a few queries against the cache is a
    # matrix-vector product, memory-bound, where fused training kernels gain nothing.
    backend = 'xla' if cache is not None else self.backend
    out_BxTxNxH = attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, backend)
    out_BxTxD = jnp.einsum('btnh,nhd->btd', out_BxTxNxH, self.w_o_NxHxD[...])
    out_BxTxD = checkpoint_name(out_BxTxD, 'attn_out')
    return out_BxTxD if cache is None else (out_BxTxD, cache)


def _write(cache: KVCache, k_BxTxKxH, v_BxTxKxH):
  """Writes new keys and values into `cache.layer` at slot `cache.length` (in place under
  jit); returns the cache and that layer's keys and values [B, S, K, H]."""
  at = (cache.layer, 0, cache.length, 0, 0)
  k = jax.lax.dynamic_update_slice(cache.k_LxBxSxKxH, k_BxTxKxH[None].astype(
      cache.k_LxBxSxKxH.dtype), at)
  v = jax.lax.dynamic_update_slice(cache.v_LxBxSxKxH, v_BxTxKxH[None].astype(
      cache.v_LxBxSxKxH.dtype), at)
  k, v = parallel.constrain(k, CACHE_AXES), parallel.constrain(v, CACHE_AXES)
  cache = KVCache(k, v, cache.length, cache.layer)
  layer = lambda x: jax.lax.dynamic_index_in_dim(x, cache.layer, 0, keepdims=False)
  return cache, layer(k), layer(v)
