"""A world model that knows the motion: the reference the CWM probes are checked against.

Its prediction of each frame-1 code is frame 0 carried along a known flow field: a mixture
of the codes of the frame-0 cells whose pixels land in that cell (weighted by how many),
read from the frame-0 tokens of the sequence it is given; where nothing lands it does not
know (uniform). It has the WorldModel's interface (layout, tokenizer, tokenize, features,
init_cache, decode, content_logits), so the probes of counterfactual.py take it unchanged.
Its flow comes from the synthetic renderer (exact), never from a model.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from brainscale.cwm.sequence import Layout
from brainscale.cwm.tokenizer import Tokenizer

SOURCES = 8        # frame-0 cells kept per frame-1 cell (the largest shares)
FLOOR = 1e-9       # probability mass spread over all codes, so log-probs stay finite
NEVER = 2 ** 30    # the slot of a frame-0 cell not yet fed


def carry_weights(flow_HxWx2: np.ndarray, visible_HxW: np.ndarray, code: int,
                  sources: int = SOURCES) -> tuple[np.ndarray, np.ndarray]:
  """Which frame-0 cells make up each frame-1 cell, and how much of it.

  Each visible frame-0 pixel goes to pixel centre + flow, splatted bilinearly; a frame-1
  cell's share from a frame-0 cell is the pixels that land in it over the pixels a cell
  holds (or over all that land, if more do). Cells are row-major on the code grid.
  Returns source [h*w, sources] (int32) and share [h*w, sources] (float32, rows sum <= 1).
  """
  flow = np.asarray(flow_HxWx2, np.float64)
  hh, ww = flow.shape[:2]
  h, w = hh // code, ww // code
  y_HxW, x_HxW = np.mgrid[:hh, :ww]
  keep = np.asarray(visible_HxW, bool)
  qx, qy = (x_HxW + flow[..., 0])[keep], (y_HxW + flow[..., 1])[keep]
  src = ((y_HxW // code) * w + x_HxW // code)[keep]
  x0, y0 = np.floor(qx).astype(int), np.floor(qy).astype(int)
  fx, fy = qx - x0, qy - y0
  keys, amounts = [], []
  for dx, dy, a in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                    (1, 1, fx * fy)):
    tx, ty = x0 + dx, y0 + dy
    inside = (tx >= 0) & (tx < ww) & (ty >= 0) & (ty < hh) & (a > 0)
    keys.append(((ty // code) * w + tx // code)[inside] * (h * w) + src[inside])
    amounts.append(a[inside])
  pairs, where = np.unique(np.concatenate(keys), return_inverse=True)
  amount_Q = np.bincount(where, np.concatenate(amounts), minlength=len(pairs))
  dst_Q, src_Q = pairs // (h * w), pairs % (h * w)
  landed_C = np.bincount(dst_Q, amount_Q, minlength=h * w)
  share_Q = amount_Q / np.maximum(landed_C, code * code)[dst_Q]
  source = np.zeros((h * w, sources), np.int32)
  share = np.zeros((h * w, sources), np.float32)
  order = np.lexsort((-share_Q, dst_Q))                     # by cell, largest share first
  dst_Q, src_Q, share_Q = dst_Q[order], src_Q[order], share_Q[order]
  rank_Q = np.arange(len(dst_Q)) - np.searchsorted(dst_Q, dst_Q)
  top = rank_Q < sources
  source[dst_Q[top], rank_Q[top]] = src_Q[top]
  share[dst_Q[top], rank_Q[top]] = share_Q[top]
  return source, share


@dataclasses.dataclass(frozen=True)
class Cache:
  """What the oracle has read: each frame-0 cell's code and the slot it came in at."""
  codes_BxC: jax.Array       # int32 [B, h*w]
  fed_at_BxC: jax.Array      # int32 [B, h*w], NEVER if not yet fed
  length: jax.Array          # int32 []: slots filled
  slots: int

  def repeat(self, n: int) -> 'Cache':
    """Each batch row n times (b0, b0, ..., b1, ...), as nn.KVCache.repeat."""
    grow = lambda x: jnp.repeat(x, n, axis=0)
    return Cache(grow(self.codes_BxC), grow(self.fed_at_BxC), self.length, self.slots)


jax.tree_util.register_dataclass(Cache, data_fields=['codes_BxC', 'fed_at_BxC', 'length'],
                                 meta_fields=['slots'])


class Carry(nnx.Variable):
  """The oracle's knowledge of the motion (not a parameter: nothing trains it)."""


class Oracle(nnx.Module):
  """Frame 1 = frame 0 carried along known flows, one per clip of the batch.

  A batch of N rows given to it holds N / B rows per clip, clip-major (b0, b0, ..., b1,
  ...), as the probes lay out their variants of one clip. Masks are not read: the oracle
  reads only frame-0 tokens, which every probe shows to every query, and only those fed
  before the position it predicts from.
  """

  def __init__(self, tokenizer: Tokenizer, layout: Layout, source_BxCxK, share_BxCxK):
    self.tokenizer, self.layout = tokenizer, layout
    self.source_BxCxK = Carry(jnp.asarray(source_BxCxK, jnp.int32))
    self.share_BxCxK = Carry(jnp.asarray(share_BxCxK, jnp.float32))

  @classmethod
  def from_flow(cls, tokenizer: Tokenizer, layout: Layout, flow_BxHxWx2, visible_BxHxW,
                sources: int = SOURCES) -> 'Oracle':
    """The oracle of clips whose frame 0 moves by flow (dx, dy) to frame 1; pixels not
    `visible` in frame 1 go nowhere."""
    flow = np.asarray(flow_BxHxWx2)
    if flow.shape[1:] != (layout.height, layout.width, 2):
      raise ValueError(f'flow of shape {flow.shape}; the layout needs '
                       f'[B, {layout.height}, {layout.width}, 2]')
    pairs = [carry_weights(f, v, layout.code_px, sources) for f, v in zip(flow, visible_BxHxW)]
    return cls(tokenizer, layout, np.stack([p[0] for p in pairs]),
               np.stack([p[1] for p in pairs]))

  def tokenize(self, frames_BxFxHxWx3: jax.Array) -> jax.Array:
    """uint8 frames -> codes [B, F, H/4, W/4], by the tokenizer it was given."""
    b, f = frames_BxFxHxWx3.shape[:2]
    codes = self.tokenizer.tokenize(frames_BxFxHxWx3.reshape((b * f,) + frames_BxFxHxWx3.shape[2:]))
    return codes.reshape((b, f) + codes.shape[1:])

  def init_cache(self, batch: int, slots: int, dtype=None) -> Cache:
    del dtype
    cells = self.source_BxCxK.shape[1]
    return Cache(jnp.zeros((batch, cells), jnp.int32), jnp.full((batch, cells), NEVER, jnp.int32),
                 jnp.zeros((), jnp.int32), slots)

  def features(self, tokens_BxT: jax.Array, pos_BxTx3: jax.Array, mask=None) -> jax.Array:
    """Log-probs [B, T, codes] of the content code after each token (its 'features')."""
    del mask
    return self.decode(tokens_BxT, pos_BxTx3, self.init_cache(*tokens_BxT.shape))[0]

  def content_logits(self, x_BxQxD: jax.Array) -> jax.Array:
    return x_BxQxD

  def decode(self, tokens_BxT: jax.Array, pos_BxTx3: jax.Array, cache: Cache,
             mask=None) -> tuple[jax.Array, Cache]:
    """`features` of T tokens fed after the cache's; returns them and the cache T longer."""
    del mask
    layout, v = self.layout, self.layout.codebook
    b, t = tokens_BxT.shape
    slot_T = cache.length + jnp.arange(t, dtype=jnp.int32)
    cell_BxT, frame_BxT, content_BxT, next_BxT = _token_cells(tokens_BxT, pos_BxTx3, layout)
    # Frame-0 content tokens: their codes, known from their own slot on.
    fed_BxT = content_BxT & (frame_BxT == 0)
    rows_BxT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    drop = cache.codes_BxC.shape[1]                           # out of range: dropped
    at_BxT = jnp.where(fed_BxT, cell_BxT, drop)
    codes_BxC = cache.codes_BxC.at[rows_BxT, at_BxT].set(tokens_BxT, mode='drop')
    fed_at_BxC = cache.fed_at_BxC.at[rows_BxT, at_BxT].min(
        jnp.broadcast_to(slot_T, (b, t)), mode='drop')
    # The code after each token: frame 1's are carried from frame 0's sources.
    clip_B = jnp.arange(b) // (b // self.source_BxCxK.shape[0])
    target_BxT, frame1_BxT = next_BxT
    source_BxTxK = self.source_BxCxK[...][clip_B[:, None], target_BxT]
    share_BxTxK = self.share_BxCxK[...][clip_B[:, None], target_BxT]
    seen_BxTxK = jnp.take_along_axis(fed_at_BxC[:, None], source_BxTxK, 2) <= slot_T[:, None]
    share_BxTxK = jnp.where(seen_BxTxK & frame1_BxT[..., None], share_BxTxK, 0)
    code_BxTxK = jnp.take_along_axis(codes_BxC[:, None], source_BxTxK, 2)
    probs_BxTxV = jnp.zeros((b, t, v), jnp.float32).at[
        rows_BxT[..., None], jnp.arange(t)[None, :, None], code_BxTxK].add(share_BxTxK)
    probs_BxTxV = probs_BxTxV + (1 - share_BxTxK.sum(-1, keepdims=True)) / v
    logp_BxTxV = jnp.log((1 - FLOOR) * probs_BxTxV + FLOOR / v)
    return logp_BxTxV, Cache(codes_BxC, fed_at_BxC, cache.length + t, cache.slots)


def _token_cells(tokens_BxT, pos_BxTx3, layout: Layout):
  """Each token's code cell (row-major; pointers: their patch's first), frame and kind, and
  the cell whose code comes next with whether it is a frame-1 content code."""
  gh, gw = layout.grid
  w = 2 * gw
  pointer_BxT = tokens_BxT >= layout.codebook
  patch_BxT = jnp.where(pointer_BxT, tokens_BxT - layout.codebook, 0)
  x_BxT = jnp.round(pos_BxTx3[..., 0]).astype(jnp.int32)
  y_BxT = jnp.round(pos_BxTx3[..., 1]).astype(jnp.int32)
  frame_BxT = jnp.where(pointer_BxT, patch_BxT // layout.patches,
                        jnp.round(pos_BxTx3[..., 2]).astype(jnp.int32))
  py, px = (patch_BxT % layout.patches) // gw, patch_BxT % gw
  q_BxT = jnp.where(pointer_BxT, -1, 2 * (y_BxT % 2) + x_BxT % 2)   # pointer: before code 0
  base_y = jnp.where(pointer_BxT, 2 * py, y_BxT - y_BxT % 2)
  base_x = jnp.where(pointer_BxT, 2 * px, x_BxT - x_BxT % 2)
  q_next = jnp.minimum(q_BxT + 1, 3)
  target_BxT = (base_y + q_next // 2) * w + base_x + q_next % 2
  cell_BxT = jnp.clip(y_BxT, 0, 2 * gh - 1) * w + jnp.clip(x_BxT, 0, w - 1)
  frame1_next_BxT = (frame_BxT == 1) & (q_BxT < 3)
  return cell_BxT, frame_BxT, ~pointer_BxT, (target_BxT, frame1_next_BxT)
