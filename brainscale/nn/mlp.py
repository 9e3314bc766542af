"""Feed-forward blocks: GELU (CWM) and SwiGLU (Enigma), no biases."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from brainscale import parallel
from brainscale.nn.core import param
from brainscale.parallel import ACT_MLP, BATCH, EMBED, LENGTH, MLP


class GeluMLP(nnx.Module):
  """w_out(gelu(w_in x))."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.w_in_DxF = param(rngs, (dim, hidden), (EMBED, MLP))
    self.w_out_FxD = param(rngs, (hidden, dim), (MLP, EMBED))

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    h_BxTxF = jnp.einsum('btd,df->btf', x_BxTxD, self.w_in_DxF[...])
    h_BxTxF = parallel.constrain(jax.nn.gelu(h_BxTxF), (BATCH, LENGTH, ACT_MLP))
    out_BxTxD = jnp.einsum('btf,fd->btd', h_BxTxF, self.w_out_FxD[...])
    return checkpoint_name(out_BxTxD, 'mlp_out')


class SwiGLU(nnx.Module):
  """w_out(silu(w_gate x) * w_up x)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.w_gate_DxF = param(rngs, (dim, hidden), (EMBED, MLP))
    self.w_up_DxF = param(rngs, (dim, hidden), (EMBED, MLP))
    self.w_out_FxD = param(rngs, (hidden, dim), (MLP, EMBED))

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    gate_BxTxF = jnp.einsum('btd,df->btf', x_BxTxD, self.w_gate_DxF[...])
    up_BxTxF = jnp.einsum('btd,df->btf', x_BxTxD, self.w_up_DxF[...])
    h_BxTxF = parallel.constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF,
                                 (BATCH, LENGTH, ACT_MLP))
    out_BxTxD = jnp.einsum('btf,fd->btd', h_BxTxF, self.w_out_FxD[...])
    return checkpoint_name(out_BxTxD, 'mlp_out')


def make_mlp(kind: str, dim: int, hidden: int, *, rngs: nnx.Rngs) -> nnx.Module:
  kinds = {'gelu': GeluMLP, 'swiglu': SwiGLU}
  if kind not in kinds:
    raise ValueError(f'mlp={kind!r}; expected one of {sorted(kinds)}')
  return kinds[kind](dim, hidden, rngs=rngs)
