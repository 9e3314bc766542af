"""Frames of codes <-> pointer/content token sequences in random patch order.

A frame of H x W pixels has (H/4) x (W/4) tokenizer codes. Each 8 x 8 patch
holds 2 x 2 codes and becomes five tokens: one *pointer* (which patch of which
frame comes next) and its four *content* codes in row-major order. Frame 0's
patches come first, then frame 1's, each frame in a fresh random order per
example, so the model learns to fill in any patch given any others.

Token ids: content codes are [0, codebook); the pointer of patch g = f * P + p
(frame f, patch p in row-major order, P patches per frame) is codebook + g.
Positions (x, y, t) are in code units, one per token, for 3D rotary
embeddings: a content token sits on its code, a pointer on its patch centre.

Shape suffixes: B batch, F frames, h x w codes of a frame, P patches of a frame, N patches
in sequence order (all F x P, or a prefix), L tokens (TOKENS_PER_PATCH x N), 4 the
CODES_PER_PATCH content codes of a patch, 5 the TOKENS_PER_PATCH tokens of a patch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

TOKENS_PER_PATCH = 5   # pointer + 2 x 2 content codes
CODES_PER_PATCH = 4    # the 2 x 2 content codes of a patch


@dataclasses.dataclass(frozen=True)
class Layout:
  """The geometry of a sequence: frame size, patch and code size, codebook."""
  height: int
  width: int
  codebook: int           # tokenizer codebook size (content vocabulary)
  frames: int = 2
  patch: int = 8          # pixels per patch side
  code_px: int = 4        # pixels per code side (the tokenizer's model.patch)

  def __post_init__(self):
    if self.patch % self.code_px:
      raise ValueError(f'patch={self.patch} is not a multiple of code_px={self.code_px}')
    if self.height % self.patch or self.width % self.patch:
      raise ValueError(f'frames of {self.height}x{self.width} pixels do not split into '
                       f'{self.patch}x{self.patch} patches')
    if self.per_side != 2:
      raise ValueError(f'a patch holds 2x2 codes (4 content tokens); patch={self.patch}, '
                       f'code_px={self.code_px} gives {self.per_side}x{self.per_side}')

  @property
  def per_side(self) -> int:
    return self.patch // self.code_px

  @property
  def grid(self) -> tuple[int, int]:
    """Patches per frame along y and x."""
    return self.height // self.patch, self.width // self.patch

  @property
  def patches(self) -> int:
    """Patches per frame (P)."""
    return self.grid[0] * self.grid[1]

  @property
  def length(self) -> int:
    """Tokens in a full sequence."""
    return self.frames * self.patches * TOKENS_PER_PATCH

  @property
  def vocab(self) -> int:
    """Content codes plus one pointer per patch of every frame."""
    return self.codebook + self.frames * self.patches


def patchify(codes_BxFxhxw: jax.Array, layout: Layout) -> jax.Array:
  """Codes per patch: [B, F*P, 4], patch g = f * P + row-major patch index."""
  b = codes_BxFxhxw.shape[0]
  gh, gw = layout.grid
  x = codes_BxFxhxw.reshape(b, layout.frames, gh, 2, gw, 2)
  return x.transpose(0, 1, 2, 4, 3, 5).reshape(b, layout.frames * layout.patches,
                                               CODES_PER_PATCH)


def unpatchify(content_BxNx4: jax.Array, layout: Layout) -> jax.Array:
  """Inverse of `patchify`: [B, F, h, w]."""
  b = content_BxNx4.shape[0]
  gh, gw = layout.grid
  x = content_BxNx4.reshape(b, layout.frames, gh, gw, 2, 2)
  return x.transpose(0, 1, 2, 4, 3, 5).reshape(b, layout.frames, 2 * gh, 2 * gw)


def patch_positions(layout: Layout) -> np.ndarray:
  """(x, y, t) of the five tokens of every patch, code units: [F*P, 5, 3]."""
  gh, gw = layout.grid
  f, i, j = np.meshgrid(np.arange(layout.frames), np.arange(gh), np.arange(gw), indexing='ij')
  f, i, j = (a.reshape(-1).astype(np.float32) for a in (f, i, j))
  pointer = np.stack([2 * j + 0.5, 2 * i + 0.5, f], -1)
  content = [np.stack([2 * j + q % 2, 2 * i + q // 2, f], -1) for q in range(CODES_PER_PATCH)]
  return np.stack([pointer] + content, axis=1)


@dataclasses.dataclass(frozen=True)
class Sequence:
  """A batch of token sequences with what the model and loss need."""
  tokens_BxL: jax.Array      # int32 token ids
  pos_BxLx3: jax.Array       # float32 (x, y, t) in code units
  frame_BxL: jax.Array       # int32 frame of each token's patch
  content_BxL: jax.Array     # bool: a content token (pointers are False)


jax.tree_util.register_dataclass(
    Sequence, data_fields=['tokens_BxL', 'pos_BxLx3', 'frame_BxL', 'content_BxL'],
    meta_fields=[])


def build(codes_BxFxhxw: jax.Array, order_BxN: jax.Array, layout: Layout) -> Sequence:
  """The sequence of the patches `order` lists (all of them, or a prefix), TOKENS_PER_PATCH
  tokens each."""
  b, n = order_BxN.shape
  content_BxNx4 = jnp.take_along_axis(patchify(codes_BxFxhxw, layout), order_BxN[..., None], 1)
  pointer_BxNx1 = (layout.codebook + order_BxN)[..., None]
  length = TOKENS_PER_PATCH * n
  tokens_BxL = jnp.concatenate([pointer_BxNx1, content_BxNx4], -1).reshape(b, length)
  pos_BxLx3 = jnp.asarray(patch_positions(layout))[order_BxN].reshape(b, length, 3)
  frame_BxL = jnp.repeat(order_BxN // layout.patches, TOKENS_PER_PATCH, axis=1)
  content_BxL = jnp.tile(jnp.arange(TOKENS_PER_PATCH) > 0, (b, n))
  return Sequence(tokens_BxL.astype(jnp.int32), pos_BxLx3, frame_BxL.astype(jnp.int32),
                  content_BxL)


def parse(tokens_BxL: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
  """Reads a (possibly partial) sequence back into frames of codes.

  Returns codes [B, F, h, w] (0 where a patch is absent) and a bool mask
  [B, F, P] of the patches the sequence holds. Uses the pointer tokens only.
  """
  tokens_BxL = np.asarray(tokens_BxL)
  b, length = tokens_BxL.shape
  if length % TOKENS_PER_PATCH:
    raise ValueError(f'a sequence has {TOKENS_PER_PATCH} tokens per patch; got length {length}')
  tok_BxNx5 = tokens_BxL.reshape(b, length // TOKENS_PER_PATCH, TOKENS_PER_PATCH)
  g_BxN = tok_BxNx5[..., 0] - layout.codebook
  if (g_BxN < 0).any() or (g_BxN >= layout.frames * layout.patches).any():
    raise ValueError('a pointer slot holds a token that is not a pointer')
  content = np.zeros((b, layout.frames * layout.patches, CODES_PER_PATCH), tokens_BxL.dtype)
  present = np.zeros((b, layout.frames * layout.patches), bool)
  rows = np.arange(b)[:, None]
  content[rows, g_BxN] = tok_BxNx5[..., 1:]
  present[rows, g_BxN] = True
  codes = np.asarray(unpatchify(content, layout))
  return codes, present.reshape(b, layout.frames, layout.patches)


def random_order(key: jax.Array, batch: int, layout: Layout) -> jax.Array:
  """Frame 0's patches in random order, then frame 1's, ...: [B, F*P], fresh per example."""
  p = layout.patches
  keys = jax.random.split(key, (batch, layout.frames))
  perm = jax.vmap(jax.vmap(lambda k: jax.random.permutation(k, p)))(keys)
  return (perm + p * jnp.arange(layout.frames)[None, :, None]).reshape(batch, -1).astype(jnp.int32)


def loss_weights(seq: Sequence, layout: Layout, *, frame0_weight: float,
                 revealed_B: jax.Array | None = None) -> jax.Array:
  """Per-token loss weights [B, L]: content tokens only; frame 0 by `frame0_weight`.

  `revealed_B` frame-1 patches right after frame 0 carry no loss (they play
  the patches a probe reveals).
  """
  w_BxL = seq.content_BxL * jnp.where(seq.frame_BxL == 0, frame0_weight, 1.0)
  if revealed_B is not None:
    first_f1 = TOKENS_PER_PATCH * layout.patches
    index_L = jnp.arange(seq.tokens_BxL.shape[1])
    revealed_BxL = ((index_L[None] >= first_f1)
                    & (index_L[None] < first_f1 + TOKENS_PER_PATCH * revealed_B[:, None]))
    w_BxL = jnp.where(revealed_BxL, 0.0, w_BxL)
  return w_BxL.astype(jnp.float32)
