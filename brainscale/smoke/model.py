"""A decoder-only transformer on shared nn/ blocks: embed, scanned Blocks, norm, head."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from brainscale import nn, parallel
from brainscale.parallel import WHOLE


@dataclasses.dataclass(frozen=True)
class Spec:
  """What TinyLM is built from (config.typed(Spec, config.model))."""
  vocab: int
  dim: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  mlp: str                # gelu | swiglu
  mlp_hidden: int
  qk_norm: bool
  attention: str          # an nn attention backend
  remat: str              # a name in nn.REMAT_POLICIES


class TinyLM(nnx.Module):

  def __init__(self, c: Spec, *, rngs: nnx.Rngs):
    self.embed = nn.Embed(c.vocab, c.dim, rngs=rngs)
    self.blocks = nn.Stack(
        lambda r: nn.Block(c.dim, c.heads, c.head_dim, c.mlp_hidden, num_kv_heads=c.kv_heads,
                           mlp=c.mlp, qk_norm=c.qk_norm, backend=c.attention, rngs=r),
        c.layers, remat=c.remat, rngs=rngs)
    self.norm = nn.RMSNorm(c.dim, rngs=rngs)
    self.head = nn.Head(c.dim, c.vocab, rngs=rngs)
    self.head_dim = c.head_dim

  def features(self, ids_BxT: jax.Array) -> jax.Array:
    """Final normalised hidden states [B, T, D]."""
    x_BxTxD = parallel.constrain(self.embed(ids_BxT), WHOLE)
    t_BxT = jnp.broadcast_to(jnp.arange(ids_BxT.shape[1]), ids_BxT.shape)
    rope = nn.rope_1d(t_BxT, self.head_dim)
    x_BxTxD = self.blocks(x_BxTxD, mask=nn.Mask(causal=True), rope_q=rope, rope_k=rope)
    return self.norm(x_BxTxD)

  def __call__(self, ids_BxT: jax.Array) -> jax.Array:
    return self.head(self.features(ids_BxT))
