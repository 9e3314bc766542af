"""Pre-norm transformer Block and a Stack that scans over layers with a named remat policy.

Stack keeps one copy of each Block parameter with a leading 'layers' axis and
runs the layers under jax.lax.scan, so compile time and memory do not grow
with depth. REMAT_POLICIES names what each layer keeps for the backward pass.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from brainscale import parallel
from brainscale.nn.attention import Attention, KVCache, Mask
from brainscale.nn.core import RMSNorm, axes_of
from brainscale.nn.embeddings import Rotary
from brainscale.nn.mlp import make_mlp
from brainscale.parallel import LAYERS, RESIDUAL, WHOLE
from kernels import flash_attention

_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    'none': None,                                        # keep everything
    'full': _policies.nothing_saveable,                  # keep only the layer input
    'dots': _policies.dots_with_no_batch_dims_saveable,  # keep projection outputs
    'save_qkv': _policies.save_only_these_names('qkv'),
    'save_qkv_out': _policies.save_only_these_names('qkv', 'attn_out', 'mlp_out'),
    # pallas backend: keep the flash kernel's output and log-sum-exp; the backward reruns
    # the projections and the MLP but not the attention forward (elsewhere: as 'full')
    'save_attention': _policies.save_only_these_names(flash_attention.RESIDUALS),
}


class Block(nnx.Module):
  """x + attn(norm(x)[, kv]); x + mlp(norm(x))."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, *,
               num_kv_heads: int = 0, mlp: str = 'gelu', qk_norm: bool = False,
               kv_dim: int = 0, backend: str = 'xla', rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(dim, rngs=rngs)
    self.attn = Attention(dim, num_heads, head_dim, num_kv_heads=num_kv_heads,
                          kv_dim=kv_dim, qk_norm=qk_norm, backend=backend, rngs=rngs)
    self.mlp_norm = RMSNorm(dim, rngs=rngs)
    self.mlp = make_mlp(mlp, dim, mlp_hidden, rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array, kv_BxSxE: jax.Array | None = None, *,
               mask: Mask = Mask(), rope_q: Rotary | None = None,
               rope_k: Rotary | None = None, cache: KVCache | None = None):
    """[B, T, D]; with a cache, (x, cache) as Attention returns it."""
    # The residual stream (what remat keeps per layer) may be split along its length
    # ('act_length' -> 'tensor': Megatron's sequence parallelism); the normed input of
    # attention and the MLP is whole along it ('length'), so their weights stay split over
    # heads and hidden units and are never gathered.
    attended = self.attn(parallel.constrain(self.attn_norm(x_BxTxD), WHOLE), kv_BxSxE,
                         mask=mask, rope_q=rope_q, rope_k=rope_k, cache=cache)
    if cache is not None:
      attended, cache = attended
    x_BxTxD = parallel.constrain(x_BxTxD + attended, RESIDUAL)
    x_BxTxD = x_BxTxD + self.mlp(parallel.constrain(self.mlp_norm(x_BxTxD), WHOLE))
    x_BxTxD = parallel.constrain(x_BxTxD, RESIDUAL)
    return x_BxTxD if cache is None else (x_BxTxD, cache)


class Stack(nnx.Module):
  """`num_layers` copies of `make_block(rngs)` applied in sequence by jax.lax.scan."""

  def __init__(self, make_block, num_layers: int, *, remat: str = 'full', rngs: nnx.Rngs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f'remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}')

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return make_block(rngs)

    self.layers = create(rngs)
    for _, variable in nnx.to_flat_state(nnx.state(self.layers, nnx.Param)):
      variable.set_metadata('axes', (LAYERS,) + axes_of(variable))
    self.num_layers = num_layers
    self.remat = remat

  def __call__(self, x_BxTxD: jax.Array, *args, **kwargs) -> jax.Array:
    graphdef, state = nnx.split(self.layers)

    def layer(x, layer_state):
      return nnx.merge(graphdef, layer_state)(x, *args, **kwargs), None

    if self.remat != 'none':
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    x_BxTxD, _ = jax.lax.scan(layer, x_BxTxD, state)
    return x_BxTxD

  def decode(self, x_BxTxD: jax.Array, cache: KVCache, *, mask: Mask, rope_q: Rotary | None = None,
             rope_k: Rotary | None = None) -> tuple[jax.Array, KVCache]:
    """T new tokens through every layer against the cache (no remat: nothing is
    differentiated). Writes their keys and values at slot `cache.length` of each layer
    and returns the cache `T` slots longer. `mask` is over cache slots (nn.slot_mask)."""
    if cache.k_LxBxSxKxH.shape[0] != self.num_layers:
      raise ValueError(f'the cache holds {cache.k_LxBxSxKxH.shape[0]} layers; this stack has '
                       f'{self.num_layers}')
    graphdef, state = nnx.split(self.layers)

    def layer(carry, xs):
      x, k, v = carry
      layer_state, index = xs
      block = nnx.merge(graphdef, layer_state)
      x, written = block(x, mask=mask, rope_q=rope_q, rope_k=rope_k,
                         cache=KVCache(k, v, cache.length, index))
      return (x, written.k_LxBxSxKxH, written.v_LxBxSxKxH), None

    index_L = jnp.arange(self.num_layers, dtype=jnp.int32)
    (x_BxTxD, k, v), _ = jax.lax.scan(
        layer, (x_BxTxD, cache.k_LxBxSxKxH, cache.v_LxBxSxKxH), (state, index_L))
    return x_BxTxD, KVCache(k, v, cache.length + x_BxTxD.shape[1], cache.layer)


def stack_activation_bytes(*, layers: int, tokens: int, dim: int, mlp_hidden: int,
                           heads: int, seq: int, remat: str, bytes_per: int = 2,
                           dense_scores: bool = True) -> int:
  """Analytic activation memory of a Stack's backward pass on one device.

  `tokens` = batch x sequence on the device. Saved per layer: the layer input
  (all policies) plus what the policy keeps; plus one layer's working set while
  it is recomputed. Dense attention scores (xla backend) add heads x seq^2 fp32.
  """
  qkv = 3 * tokens * dim
  outs = 2 * tokens * dim
  proj = qkv + outs + 2 * tokens * mlp_hidden
  kept = {'none': proj + 4 * tokens * dim + tokens * mlp_hidden, 'full': 0,
          'dots': proj, 'save_qkv': qkv, 'save_qkv_out': qkv + outs,
          'save_attention': tokens * dim + 2 * tokens * heads}[remat]   # output, fp32 lse
  saved = layers * (tokens * dim + kept) * bytes_per
  working = (proj + 4 * tokens * dim + tokens * mlp_hidden) * bytes_per
  if dense_scores:
    working += 2 * (tokens // max(seq, 1)) * heads * seq * seq * 4
  return saved + working
