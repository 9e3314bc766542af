"""Multi-head self- and cross-attention with GQA, QK-norm and structured masks.

A `Mask` describes which keys a query sees (causal, sliding window over
positions, padding, segments) without materialising it, so each backend can
use its fastest form: `xla` builds the boolean mask (the reference), `cudnn`
calls jax.nn.dot_product_attention's fused kernel, `pallas` calls
kernels.flash_attention.
"""

import dataclasses
import math

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from brainscale import parallel
from brainscale.nn.core import RMSNorm, param
from brainscale.nn.embeddings import Rotary, apply_rope


@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query attends to.

  causal: key position <= query position. window: additionally
  query position - key position < window (positions default to token index;
  pass times for a window in seconds). kv_valid: False marks key padding.
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

    heads = ('batch', None, 'act_heads', None)
    rows = {name: ('batch', None) for name in arrays}
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
    self.w_q_DxNxH = param(rngs, (dim, num_heads, head_dim), ('embed', 'heads', 'head_dim'))
    self.w_k_ExKxH = param(rngs, (kv_dim, num_kv_heads, head_dim),
                           ('embed', 'kv_heads', 'head_dim'))
    self.w_v_ExKxH = param(rngs, (kv_dim, num_kv_heads, head_dim),
                           ('embed', 'kv_heads', 'head_dim'))
    self.w_o_NxHxD = param(rngs, (num_heads, head_dim, dim), ('heads', 'head_dim', 'embed'),
                           fan_in=num_heads * head_dim)
    self.q_norm = RMSNorm(head_dim, axis_name='head_dim', rngs=rngs) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, axis_name='head_dim', rngs=rngs) if qk_norm else None
    self.backend = backend

  def __call__(self, x_BxTxD: jax.Array, kv_BxSxE: jax.Array | None = None, *,
               mask: Mask = Mask(), rope_q: Rotary | None = None,
               rope_k: Rotary | None = None) -> jax.Array:
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
    heads = ('batch', 'length', 'act_heads', None)
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = (parallel.constrain(a, heads)
                                       for a in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = (checkpoint_name(a, 'qkv')
                                       for a in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
    out_BxTxNxH = attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, self.backend)
    out_BxTxD = jnp.einsum('btnh,nhd->btd', out_BxTxNxH, self.w_o_NxHxD[...])
    return checkpoint_name(out_BxTxD, 'attn_out')
