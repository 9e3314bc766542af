"""The world model: a causal transformer over pointer + content tokens, with its tokenizer.

Pre-RMSNorm blocks without biases, full multi-head attention, GELU MLP, 3D
rotary embeddings on (x, y, t), untied output head (LRAS/PSI). The frozen
tokenizer is a submodule, so a checkpoint holds everything needed to turn
frames into tokens and predictions back into pixels.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from brainscale import nn, parallel
from brainscale.cwm import tokenizer
from brainscale.cwm.sequence import Layout
from brainscale.parallel import EMBED, VOCAB, WHOLE


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the WorldModel is built from (config.typed(Spec, config.model))."""
  vocab: int              # content codes + pointers, padded
  dim: int
  layers: int
  heads: int
  head_dim: int
  mlp_hidden: int
  qk_norm: bool
  rope_base: float
  latent_embed: bool      # content codes also enter by their LFQ latent
  latent_head: bool       # ... and their logits also score it
  attention: str          # an nn attention backend
  remat: str              # a name in nn.REMAT_POLICIES


class WorldModel(nnx.Module):

  def __init__(self, c: Spec, tokenizer_spec: tokenizer.Spec, layout: Layout, *,
               rngs: nnx.Rngs):
    if c.vocab < layout.vocab:
      raise ValueError(f'model.vocab={c.vocab} is smaller than the {layout.vocab} tokens this '
                       f'layout needs ({layout.codebook} codes + {layout.vocab - layout.codebook} '
                       'pointers)')
    self.tokenizer = tokenizer.Tokenizer(tokenizer_spec, rngs=rngs)
    if self.tokenizer.vocab != layout.codebook:
      raise ValueError(f'tokenizer has {self.tokenizer.vocab} codes, layout expects '
                       f'{layout.codebook}')
    self.embed = nn.Embed(c.vocab, c.dim, rngs=rngs)
    # Codes are not arbitrary symbols: a content token also enters through its
    # quantized latent (LFQ bits), so similar patches start with similar embeddings.
    k = self.tokenizer.latent_channels
    self.w_latent_kxD = (nn.param(rngs, (k, c.dim), (None, EMBED), fan_in=k)
                         if c.latent_embed else None)
    self.blocks = nn.Stack(
        lambda r: nn.Block(c.dim, c.heads, c.head_dim, c.mlp_hidden, mlp='gelu',
                           qk_norm=c.qk_norm, backend=c.attention, rngs=r),
        c.layers, remat=c.remat, rngs=rngs)
    self.norm = nn.RMSNorm(c.dim, rngs=rngs)
    self.head = nn.Head(c.dim, c.vocab, rngs=rngs)
    # ... and leave through it: a content code's logit also scores its latent, so
    # the model can learn each bit of the next code rather than 2^bits symbols.
    self.w_unlatent_Dxk = (nn.param(rngs, (c.dim, k), (EMBED, None), init='zeros')
                           if c.latent_head else None)
    self.head_dim = c.head_dim
    self.rope_base = c.rope_base
    self.layout = layout

  def tokenize(self, frames_BxFxHxWx3: jax.Array) -> jax.Array:
    """uint8 frames -> codes [B, F, H/4, W/4] (tokenize stops the gradient)."""
    b, f = frames_BxFxHxWx3.shape[:2]
    codes = self.tokenizer.tokenize(frames_BxFxHxWx3.reshape((b * f,) + frames_BxFxHxWx3.shape[2:]))
    return codes.reshape((b, f) + codes.shape[1:])

  def features(self, tokens_BxT: jax.Array, pos_BxTx3: jax.Array,
               mask: nn.Mask = nn.Mask(causal=True)) -> jax.Array:
    """Final normalised hidden states [B, T, D] (causal unless told otherwise)."""
    rope = nn.rope_nd(pos_BxTx3, self.head_dim, split=(6, 6, 4), base=self.rope_base)
    x_BxTxD = self.blocks(self._embed(tokens_BxT), mask=mask, rope_q=rope, rope_k=rope)
    return self.norm(x_BxTxD)

  def init_cache(self, batch: int, slots: int, dtype=None) -> nn.KVCache:
    """An empty KV cache of `slots` tokens for `decode`, in the embedding's dtype."""
    _, kv_heads, head_dim = self.blocks.layers.attn.w_k_ExKxH.shape[-3:]
    dtype = self.embed.table_VxD[...].dtype if dtype is None else dtype
    return nn.KVCache.zeros(self.blocks.num_layers, batch, slots, kv_heads, head_dim, dtype)

  def decode(self, tokens_BxT: jax.Array, pos_BxTx3: jax.Array, cache: nn.KVCache,
             mask: nn.Mask | None = None) -> tuple[jax.Array, nn.KVCache]:
    """`features` of T tokens fed after the cache's (causal over slots unless `mask`
    says more; see nn.slot_mask); returns them and the cache T slots longer."""
    b, t = tokens_BxT.shape
    mask = nn.slot_mask(cache, t, b) if mask is None else mask
    rope = nn.rope_nd(pos_BxTx3, self.head_dim, split=(6, 6, 4), base=self.rope_base)
    x_BxTxD, cache = self.blocks.decode(self._embed(tokens_BxT), cache, mask=mask,
                                        rope_q=rope, rope_k=rope)
    return self.norm(x_BxTxD), cache

  def _embed(self, tokens_BxT: jax.Array) -> jax.Array:
    x_BxTxD = self.embed(tokens_BxT)
    if self.w_latent_kxD is not None:
      content_BxT = tokens_BxT < self.layout.codebook
      latent_BxTxk = self.tokenizer.codes_to_latent(jnp.where(content_BxT, tokens_BxT, 0))
      x_BxTxD = x_BxTxD + jnp.where(content_BxT[..., None], jnp.einsum(
          'btk,kd->btd', latent_BxTxk.astype(x_BxTxD.dtype), self.w_latent_kxD[...]), 0)
    return parallel.constrain(x_BxTxD, WHOLE)

  def output_weights(self) -> jax.Array:
    """The output projection [D, vocab]: the head, plus the latent scoring of content codes."""
    w_DxV = self.head.w_DxV[...]
    if self.w_unlatent_Dxk is None:
      return w_DxV
    latent_kxC = self.tokenizer.codebook().T.astype(w_DxV.dtype)
    w_DxC = jnp.einsum('dk,kc->dc', self.w_unlatent_Dxk[...].astype(w_DxV.dtype), latent_kxC)
    w_DxV = w_DxV + jnp.pad(w_DxC, ((0, 0), (0, w_DxV.shape[1] - w_DxC.shape[1])))
    return parallel.constrain(w_DxV, (EMBED, VOCAB))

  def content_logits(self, x_BxQxD: jax.Array) -> jax.Array:
    """Logits over the content codes only (pointers and padding excluded), fp32.

    The whole vocabulary is scored and the logits sliced: slicing the weights instead
    would gather a head split over `tensor` (the codes sit on some of its shards) for
    every decoded token."""
    logits_BxQxV = jnp.einsum('bqd,dv->bqv', x_BxQxD, self.output_weights(),
                              preferred_element_type=jnp.float32)
    return logits_BxQxV[..., :self.layout.codebook]
