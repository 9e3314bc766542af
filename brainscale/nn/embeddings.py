"""Rotary position embeddings (1D continuous time; 3D x/y/t), token embedding, output head.

Rotary pairs dimension i with i + H/2 ("rotate half"). The 3D variant splits
those H/2 pairs between x, y and t by `split` (e.g. 6/16, 6/16, 4/16) and gives
each axis its own frequency ladder.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from brainscale import parallel
from brainscale.nn.core import param
from brainscale.parallel import EMBED, VOCAB, WHOLE


@dataclasses.dataclass(frozen=True)
class Rotary:
  """Angles as cos/sin, broadcast over heads when applied."""
  cos_BxTxP: jax.Array
  sin_BxTxP: jax.Array


jax.tree_util.register_dataclass(Rotary, data_fields=['cos_BxTxP', 'sin_BxTxP'], meta_fields=[])


def _frequencies(pairs: int, base: float) -> jax.Array:
  return base ** (-jnp.arange(pairs, dtype=jnp.float32) / pairs)


def rope_1d(t_BxT: jax.Array, head_dim: int, *, base: float = 10_000.0) -> Rotary:
  """Rotary angles for continuous positions (token index, or time in any unit)."""
  if head_dim % 2:
    raise ValueError(f'rotary needs an even head_dim, got {head_dim}')
  freq_P = _frequencies(head_dim // 2, base)
  angle_BxTxP = t_BxT.astype(jnp.float32)[..., None] * freq_P
  return Rotary(jnp.cos(angle_BxTxP), jnp.sin(angle_BxTxP))


def split_pairs(head_dim: int, split: tuple) -> tuple[int, ...]:
  """Pairs of head dimensions given to each axis; `split` is in parts of the sum."""
  pairs = head_dim // 2
  total = sum(split)
  counts = [pairs * s // total for s in split]
  counts[-1] += pairs - sum(counts)
  if head_dim % 2 or min(counts) < 1:
    raise ValueError(f'head_dim={head_dim} cannot be split {split} across axes')
  return tuple(counts)


def rope_nd(pos_BxTxA: jax.Array, head_dim: int, *, split: tuple = (6, 6, 4),
            base: float = 100.0) -> Rotary:
  """Rotary angles for A-dimensional positions (A=3: x, y, t)."""
  if pos_BxTxA.shape[-1] != len(split):
    raise ValueError(f'positions have {pos_BxTxA.shape[-1]} axes, split has {len(split)}')
  angles = []
  for axis, pairs in enumerate(split_pairs(head_dim, split)):
    freq_P = _frequencies(pairs, base)
    angles.append(pos_BxTxA[..., axis].astype(jnp.float32)[..., None] * freq_P)
  angle_BxTxP = jnp.concatenate(angles, axis=-1)
  return Rotary(jnp.cos(angle_BxTxP), jnp.sin(angle_BxTxP))


def apply_rope(x_BxTxNxH: jax.Array, rot: Rotary) -> jax.Array:
  """Rotates pairs (i, i + H/2) of every head by the angles of its token."""
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  cos, sin = rot.cos_BxTxP[:, :, None, :], rot.sin_BxTxP[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


class Embed(nnx.Module):
  """Token ids -> vectors."""

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
    self.table_VxD = param(rngs, (vocab, dim), (VOCAB, EMBED), fan_in=dim)

  def __call__(self, ids_BxT: jax.Array) -> jax.Array:
    # Gather from a table whole along 'embed' and split only along 'vocab': each device
    # looks up the ids of its vocabulary shard and the shards are summed. A table split
    # along 'embed' (as FSDP stores it) makes XLA's partitioner replicate the output.
    table_VxD = parallel.constrain(self.table_VxD[...], (VOCAB, None))
    shards = parallel.ways(VOCAB, table_VxD.shape[0])
    if shards == 1:
      x_BxTxD = jnp.take(table_VxD, ids_BxT, axis=0)
    else:
      # Spelled out, so that no partitioner gathers the table: one id per step (decoding)
      # becomes a dynamic slice, which XLA partitions by gathering the whole table.
      rows = table_VxD.shape[0] // shards
      table_SxRxD = parallel.constrain(table_VxD.reshape(shards, rows, -1), (VOCAB, None, None))
      found_SxBxTxD = jnp.take(table_SxRxD, ids_BxT % rows, axis=1)
      mine_SxBxT = (ids_BxT // rows)[None] == jnp.arange(shards)[:, None, None]
      x_BxTxD = jnp.where(mine_SxBxT[..., None], found_SxBxTxD, 0).sum(0)
    return parallel.constrain(x_BxTxD, WHOLE)


class Head(nnx.Module):
  """Untied output projection; `w_DxV` feeds the chunked loss directly."""

  def __init__(self, dim: int, vocab: int, *, rngs: nnx.Rngs):
    self.w_DxV = param(rngs, (dim, vocab), (EMBED, VOCAB))

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    return jnp.einsum('btd,dv->btv', x_BxTxD, self.w_DxV[...])
