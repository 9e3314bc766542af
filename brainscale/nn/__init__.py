"""Model-agnostic Flax NNX modules; nothing here knows CWM or Enigma.

Shape suffixes (x_BxTxD: a [B, T, D] array), the key for nn/ and every family; a model
module's docstring adds its own letters and says where one differs in that module:
  B batch                 T query tokens           S key tokens
  D model dim             N query heads            K key/value heads
  H head dim              F MLP hidden             V vocabulary
  L layers (a Stack's leading axis; a KVCache's too)
  in losses.py N counts the tokens of a flattened batch and C a chunk of the vocabulary
Parameter attribute names (w_q_DxNxH, table_VxD, ...) are checkpoint paths: renaming
one breaks restoring the checkpoints that hold it, so they keep their letters.
"""

from brainscale.nn.attention import Attention, KVCache, Mask, attend, slot_mask
from brainscale.nn.core import RMSNorm, axes_of, param
from brainscale.nn.embeddings import Embed, Head, Rotary, apply_rope, rope_1d, rope_nd
from brainscale.nn.losses import (
  chunked_cross_entropy,
  cross_entropy,
  masked_mean,
  masked_mse,
  poisson_nll,
)
from brainscale.nn.mlp import GeluMLP, SwiGLU, make_mlp
from brainscale.nn.sampling import choose
from brainscale.nn.transformer import REMAT_POLICIES, Block, Stack, stack_activation_bytes

__all__ = [
  'REMAT_POLICIES', 'Attention', 'Block', 'Embed', 'GeluMLP', 'Head', 'KVCache', 'Mask',
  'RMSNorm', 'Rotary', 'Stack', 'SwiGLU', 'apply_rope', 'attend', 'axes_of', 'choose',
  'chunked_cross_entropy', 'cross_entropy', 'make_mlp', 'masked_mean', 'masked_mse', 'param',
  'poisson_nll', 'rope_1d', 'rope_nd', 'slot_mask', 'stack_activation_bytes',
]
