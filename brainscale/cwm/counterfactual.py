"""Counterfactual probes of a trained world model, ready for a notebook.

  predict_frame  frame 1 from frame 0 plus any revealed frame-1 patches; the
                 hidden patches are decoded in parallel (each sees only the
                 context) or sequentially (each also sees those before it).
  move_patch     intervention: reveal a frame-0 patch at a new place in frame 1.
  perturb        intervention: change the pixels of a frame around points.
  kl_flow        flow of points by KL-tracing: perturb frame 0 at a point and
                 find where frame 1's predicted distributions change,
                 frame 1 given to the model in random patch orders.
  flow_from_kl   the flow a KL map points to (the centre of its mass).

Everything takes uint8 frames [B, 2, H, W, 3] (or codes) and returns arrays
ready to plot: images in [0, 1], flows in pixels (dx, dy), maps on the code
grid. Patch ids are row-major within a frame. Call under jax.jit for speed;
the functions are pure given the model.

Shape suffixes: B clips, H x W pixels, h x w codes, P patches of a frame, N patches in
sequence order, Q queried (hidden) patches, R revealed patches, L (or T) tokens, K points,
V variants of a clip, Z flattened B x K or B x V, k latent channels of a code
(Tokenizer.latent_channels), C codes of the codebook, 4 codes of a patch, D model dim.
"""

import jax
import jax.numpy as jnp
import numpy as np

from brainscale.cwm import sequence
from brainscale.cwm.decoding import decode_patches
from brainscale.cwm.model import WorldModel
from brainscale.cwm.sequence import CODES_PER_PATCH, TOKENS_PER_PATCH


def _to_grid(per_patch_BxPx4xk: jax.Array, layout: sequence.Layout) -> jax.Array:
  """Per-patch values of the 2x2 codes -> the code grid [B, h, w, k] of one frame."""
  b, _, _, k = per_patch_BxPx4xk.shape
  gh, gw = layout.grid
  x = per_patch_BxPx4xk.reshape(b, gh, gw, 2, 2, k).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * gh, 2 * gw, k)


def hidden_patches(revealed_BxR: jax.Array, patches: int) -> jax.Array:
  """The frame-1 patches not in `revealed`, ascending: [B, P - R]."""
  b, r = revealed_BxR.shape
  shown_BxP = jnp.zeros((b, patches), bool).at[jnp.arange(b)[:, None], revealed_BxR].set(True)
  return jnp.argsort(shown_BxP, axis=1, stable=True)[:, :patches - r].astype(jnp.int32)


def predict_codes(model: WorldModel, codes_Bx2xhxw: jax.Array, revealed_BxR: jax.Array, *,
                  sequential: bool = False, decode: str = 'mean', temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, key: jax.Array | None = None,
                  cached: bool = True) -> dict:
  """Frame 1 predicted from frame 0's codes and the revealed frame-1 patches.

  decode: 'mean' decodes the expected latent of each predicted code (the
  minimum-squared-error image), 'argmax' the most likely codes, 'sample' a
  sample at `temperature` from the `top_k` / `top_p` codes (the codes a
  sequential prediction conditions on are chosen the same way). Returns image
  [B, H, W, 3] in [0, 1], codes [B, h, w] (chosen), hidden [B, H, W] (pixels that
  were predicted, not revealed).
  """
  layout, tok = model.layout, model.tokenizer
  b, p = codes_Bx2xhxw.shape[0], layout.patches
  revealed_BxR = jnp.asarray(revealed_BxR, jnp.int32)
  hidden_BxQ = hidden_patches(revealed_BxR, p)
  context_BxC = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (b, p)), p + revealed_BxR], 1)
  if decode not in ('mean', 'argmax', 'sample'):
    raise ValueError(f"decode={decode!r}; expected 'mean', 'argmax' or 'sample'")
  sampling = (dict(temperature=temperature, top_k=top_k, top_p=top_p) if decode == 'sample'
              else {})
  chosen_BxQx4, logp_BxQx4xC = decode_patches(
      model, codes_Bx2xhxw, context_BxC, p + hidden_BxQ, sequential=sequential, key=key,
      cached=cached, **sampling)
  rows = jnp.arange(b)[:, None]
  content_BxPx4 = sequence.patchify(codes_Bx2xhxw, layout)[:, p:]
  content_BxPx4 = content_BxPx4.at[rows, hidden_BxQ].set(chosen_BxQx4)
  latent_BxPx4xk = tok.codes_to_latent(content_BxPx4)
  if decode == 'mean':
    expected_BxQx4xk = tok.expected_latent(jnp.exp(logp_BxQx4xC))
    latent_BxPx4xk = latent_BxPx4xk.at[rows, hidden_BxQ].set(
        expected_BxQx4xk.astype(latent_BxPx4xk.dtype))
  image_BxHxWx3 = tok.decode(_to_grid(latent_BxPx4xk, layout))
  hidden_BxP = jnp.ones((b, p), bool).at[rows, revealed_BxR].set(False)
  gh, gw = layout.grid
  hidden_BxHxW = jnp.repeat(jnp.repeat(hidden_BxP.reshape(b, gh, gw), layout.patch, 1),
                            layout.patch, 2)
  codes_Bxhxw = _to_grid(content_BxPx4[..., None], layout)[..., 0]
  return {'image': image_BxHxWx3, 'codes': codes_Bxhxw, 'hidden': hidden_BxHxW}


def predict_frame(model: WorldModel, frames_Bx2xHxWx3: jax.Array, revealed_BxR: jax.Array,
                  **kwargs) -> dict:
  """`predict_codes` from uint8 frames (tokenized by the model's own tokenizer)."""
  return predict_codes(model, model.tokenize(frames_Bx2xHxWx3), revealed_BxR, **kwargs)


def move_patch(model: WorldModel, frames_Bx2xHxWx3: jax.Array, src_patch_B: jax.Array,
               dst_patch_B: jax.Array, revealed_BxR: jax.Array, **kwargs) -> dict:
  """"What if patch `src` of frame 0 were at `dst` in frame 1?"

  Reveals frame 0's src content at dst in frame 1 (besides `revealed`, which
  should not contain dst) and predicts the rest of frame 1.
  """
  layout = model.layout
  codes_Bx2xhxw = model.tokenize(frames_Bx2xHxWx3)
  content_BxNx4 = sequence.patchify(codes_Bx2xhxw, layout)
  rows = jnp.arange(codes_Bx2xhxw.shape[0])
  moved_Bx4 = content_BxNx4[rows, src_patch_B]
  content_BxNx4 = content_BxNx4.at[rows, layout.patches + dst_patch_B].set(moved_Bx4)
  codes_Bx2xhxw = sequence.unpatchify(content_BxNx4, layout)
  revealed = jnp.concatenate([jnp.asarray(revealed_BxR, jnp.int32), dst_patch_B[:, None]], 1)
  return predict_codes(model, codes_Bx2xhxw, revealed, **kwargs)


def perturb(frames_BxHxWx3: jax.Array, points_BxKx2: jax.Array, *, size: int = 4) -> jax.Array:
  """Inverts the colours of the size x size cell (aligned to `size`) holding each point (x, y).

  Returns [B, K, H, W, 3]: one perturbed copy of each frame per point.
  """
  _, h, w, _ = frames_BxHxWx3.shape
  cell_BxKx2 = (points_BxKx2 // size).astype(jnp.int32)
  ys, xs = jnp.arange(h) // size, jnp.arange(w) // size
  inside_BxKxHxW = ((ys[None, None, :, None] == cell_BxKx2[..., 1, None, None]) &
                    (xs[None, None, None, :] == cell_BxKx2[..., 0, None, None]))
  frames_BxKxHxWx3 = jnp.broadcast_to(frames_BxHxWx3[:, None], inside_BxKxHxW.shape + (3,))
  return jnp.where(inside_BxKxHxW[..., None], 255 - frames_BxKxHxWx3, frames_BxKxHxWx3)


def frame1_log_probs(model: WorldModel, codes_Bx2xhxw: jax.Array,
                     order_BxN: jax.Array) -> jax.Array:
  """Log-probs of every frame-1 code given frame 0 and the frame-1 patches before it.

  One causal pass over the whole true sequence in `order` (frame 0's patches,
  then frame 1's). Returns [B, P, 4, codes] on frame 1's row-major patches.
  """
  seq = sequence.build(codes_Bx2xhxw, order_BxN, model.layout)
  return _frame1_read(model, model.features(seq.tokens_BxL, seq.pos_BxLx3), order_BxN, 0)


def _frame1_read(model: WorldModel, x_BxTxD: jax.Array, order_BxN: jax.Array,
                 start: int) -> jax.Array:
  """Frame-1 log-probs [B, P, 4, codes] from the features of tokens start, start + 1, ..."""
  b, p = order_BxN.shape[0], model.layout.patches
  # a frame-1 content token at 5k + j (j = 1..4) is predicted at position 5k + j - 1
  read_Px4 = (TOKENS_PER_PATCH * (p + jnp.arange(p))[:, None]
              + jnp.arange(CODES_PER_PATCH)[None] - start)
  x_BxPx4xD = x_BxTxD[:, read_Px4]
  logp_BxPx4xC = jax.nn.log_softmax(
      model.content_logits(x_BxPx4xD.reshape(b, CODES_PER_PATCH * p, -1)), -1)
  logp_BxPx4xC = logp_BxPx4xC.reshape(b, p, CODES_PER_PATCH, -1)
  patch_BxP = order_BxN[:, p:] - p                       # frame-1 patch at each slot
  rows = jnp.arange(b)[:, None]
  return jnp.zeros_like(logp_BxPx4xC).at[rows, patch_BxP].set(logp_BxPx4xC)


def kl_flow(model: WorldModel, frames_Bx2xHxWx3: jax.Array, points_BxKx2: jax.Array, *,
            orders: int = 4, floor: float = 0.5, key: jax.Array | None = None,
            cached: bool = True) -> dict:
  """Optical flow of points (x, y) of frame 0 by KL-tracing.

  For each point: invert the colours of its 4x4 code cell in frame 0, and ask
  the model for every frame-1 code given frame 0 (clean or perturbed) and the
  true frame-1 patches before it, in `orders` random patch orders (so each code
  is predicted from a different part of frame 1 each time). The KL map is
  KL(perturbed || clean) of every frame-1 code, averaged over the orders: it
  is large where the model reads the perturbed content from. The flow is read
  from the map by `flow_from_kl` (its mass above the `floor` quantile); points
  outside the frame are clipped to its edge cells. `key` draws the orders.
  Returns flow [B, K, 2] (pixels), kl [B, K, h, w] and cell centres [B, K, 2].

  The K points of a clip share each order and one clean pass. Frame 0's patches
  that no perturbation reaches come first in the order, so with `cached` they are
  fed once into a KV cache and the clean and K perturbed sequences continue from it.
  """
  layout = model.layout
  b, k = points_BxKx2.shape[:2]
  p = layout.patches
  if orders < 1:
    raise ValueError(f'kl_flow orders={orders}; expected at least 1')
  key = jax.random.key(0) if key is None else key
  clean_Bx2xhxw = model.tokenize(frames_Bx2xHxWx3)
  grid_max = jnp.array([layout.width // layout.code_px - 1, layout.height // layout.code_px - 1])
  cell_BxKx2 = jnp.clip((points_BxKx2 // layout.code_px).astype(jnp.int32), 0, grid_max)  # cx, cy
  pert0_BxKxHxWx3 = perturb(frames_Bx2xHxWx3[:, 0], layout.code_px * cell_BxKx2,
                            size=layout.code_px)
  pert0_BxKxhxw = model.tokenize(pert0_BxKxHxWx3.reshape((b * k, 1) + pert0_BxKxHxWx3.shape[2:]))
  # Variant 0 is the clean clip, variant 1 + i the clip with point i perturbed.
  variants_BxVx2xhxw = jnp.concatenate([clean_Bx2xhxw[:, None], jnp.repeat(
      clean_Bx2xhxw[:, None], k, 1).at[:, :, 0].set(pert0_BxKxhxw.reshape(
          (b, k) + pert0_BxKxhxw.shape[2:]))], 1)
  reach_BxP, window = _reached_patches(cell_BxKx2, model.tokenizer.radius, layout)
  prefix = max(p - k * window, 0) if cached else 0   # patches no perturbation reaches

  def one_order(kl_BxKxPx4, r):
    order_BxN = _order_reached_last(jax.random.fold_in(key, r), reach_BxP, layout)
    lp_BxVxPx4xC = _variant_log_probs(model, variants_BxVx2xhxw, order_BxN, prefix)
    clean_lp, pert_lp = lp_BxVxPx4xC[:, :1], lp_BxVxPx4xC[:, 1:]
    return kl_BxKxPx4 + jnp.sum(jnp.exp(pert_lp) * (pert_lp - clean_lp), -1) / orders, None

  kl_BxKxPx4, _ = jax.lax.scan(one_order, jnp.zeros((b, k, p, CODES_PER_PATCH), jnp.float32),
                               jnp.arange(orders))
  kl_Zxhxw = _to_grid(kl_BxKxPx4.reshape(b * k, p, CODES_PER_PATCH, 1), layout)[..., 0]
  from_Zx2 = layout.code_px * cell_BxKx2.reshape(b * k, 2) + (layout.code_px - 1) / 2
  flow_Zx2 = flow_from_kl(kl_Zxhxw, from_Zx2, code=layout.code_px, floor=floor)
  return {'flow': flow_Zx2.reshape(b, k, 2), 'kl': kl_Zxhxw.reshape((b, k) + kl_Zxhxw.shape[1:]),
          'cell_centre': from_Zx2.reshape(b, k, 2)}


def _reached_patches(cell_BxKx2: jax.Array, radius: int, layout: sequence.Layout):
  """Frame-0 patches whose codes a perturbation of these code cells can change [B, P],
  and the most patches one cell reaches: the tokenizer sees `radius` codes around."""
  gh, gw = layout.grid
  reach = -(-radius // layout.per_side)             # in patches, rounded up
  patch_BxKx2 = cell_BxKx2 // layout.per_side       # (px, py)
  near_x = jnp.abs(jnp.arange(gw)[None, None, :] - patch_BxKx2[..., 0, None]) <= reach
  near_y = jnp.abs(jnp.arange(gh)[None, None, :] - patch_BxKx2[..., 1, None]) <= reach
  reached_BxKxP = (near_y[..., :, None] & near_x[..., None, :]).reshape(cell_BxKx2.shape[:2] +
                                                                       (gh * gw,))
  return reached_BxKxP.any(1), min(2 * reach + 1, gh) * min(2 * reach + 1, gw)


def _order_reached_last(key: jax.Array, reached_BxP: jax.Array, layout: sequence.Layout):
  """Frame 0 in random order with the reached patches last, then frame 1 in random order."""
  b, p = reached_BxP.shape
  k0, k1 = jax.random.split(key)
  first_BxP = jnp.argsort(jax.random.uniform(k0, (b, p)) + reached_BxP, axis=1)
  second_BxP = jnp.argsort(jax.random.uniform(k1, (b, p)), axis=1)
  return jnp.concatenate([first_BxP, p + second_BxP], 1).astype(jnp.int32)


def _variant_log_probs(model: WorldModel, codes_BxVx2xhxw: jax.Array, order_BxN: jax.Array,
                       prefix: int) -> jax.Array:
  """frame1_log_probs of V variants of each clip in one order [B, V, P, 4, C]; the first
  `prefix` patches (the same in every variant) are fed once into a KV cache."""
  b, v = codes_BxVx2xhxw.shape[:2]
  layout, p = model.layout, model.layout.patches
  codes_Zx2xhxw = codes_BxVx2xhxw.reshape((b * v,) + codes_BxVx2xhxw.shape[2:])
  order_ZxN = jnp.repeat(order_BxN, v, axis=0)
  if not prefix:
    return frame1_log_probs(model, codes_Zx2xhxw, order_ZxN).reshape(
        (b, v, p, CODES_PER_PATCH, -1))
  seq = sequence.build(codes_Zx2xhxw, order_ZxN, layout)
  start = TOKENS_PER_PATCH * prefix
  shared = sequence.build(codes_BxVx2xhxw[:, 0], order_BxN[:, :prefix], layout)
  cache = model.init_cache(b, layout.length)
  _, cache = model.decode(shared.tokens_BxL, shared.pos_BxLx3, cache)
  x_ZxTxD, _ = model.decode(seq.tokens_BxL[:, start:], seq.pos_BxLx3[:, start:], cache.repeat(v))
  logp_ZxPx4xC = _frame1_read(model, x_ZxTxD, order_ZxN, start)
  return logp_ZxPx4xC.reshape((b, v) + logp_ZxPx4xC.shape[1:])


def flow_from_kl(kl_Zxhxw: jax.Array, from_Zx2: jax.Array, *, code: int = 4,
                 floor: float = 0.5) -> jax.Array:
  """Flow [Z, 2] (pixels) from KL maps on the code grid: the centre of the map's mass
  above its `floor` quantile (0.5: the median, the level most codes sit at whatever the
  perturbation), minus the perturbed cell's centre `from_Zx2` (x, y). A flat map, with
  no mass above its floor, reads as no motion.

  The whole mass, not only the peak: a small model spreads the influence of the
  perturbed cell between where it was and where it went, and its peak stays at the
  origin (benchmarks/RESULTS.md, "A readout of the whole KL map").
  """
  if not 0 <= floor < 1:
    raise ValueError(f'flow_from_kl floor={floor}; expected a quantile in [0, 1)')
  z, h, w = kl_Zxhxw.shape
  level_Z = jnp.quantile(kl_Zxhxw.reshape(z, h * w), floor, axis=1)
  mass_Zxhxw = jnp.maximum(kl_Zxhxw - level_Z[:, None, None], 0)
  total_Z = mass_Zxhxw.sum((1, 2))
  centre_h = code * jnp.arange(h) + (code - 1) / 2
  centre_w = code * jnp.arange(w) + (code - 1) / 2
  to_Zx2 = jnp.stack([jnp.einsum('zhw,w->z', mass_Zxhxw, centre_w),
                      jnp.einsum('zhw,h->z', mass_Zxhxw, centre_h)], -1)
  to_Zx2 = to_Zx2 / jnp.maximum(total_Z, 1e-30)[:, None]
  return jnp.where(total_Z[:, None] > 0, to_Zx2 - from_Zx2, 0.0)


def masked_psnr(pred_BxHxWx3: jax.Array, target_BxHxWx3: jax.Array,
                mask_BxHxW: jax.Array) -> jax.Array:
  """PSNR (dB) per image over the masked pixels; images in [0, 1]."""
  err = (pred_BxHxWx3.astype(jnp.float32) - target_BxHxWx3.astype(jnp.float32)) ** 2
  m = mask_BxHxW[..., None].astype(jnp.float32)
  mse_B = (err * m).sum((1, 2, 3)) / jnp.maximum(3 * m.sum((1, 2, 3)), 1)
  return -10 * jnp.log10(jnp.maximum(mse_B, 1e-10))


def cell_flow(flow_BxHxWx2: np.ndarray, cell_centre_BxKx2: np.ndarray, size: int = 4) -> np.ndarray:
  """Mean ground-truth flow over the size x size cell at each centre: [B, K, 2]."""
  flow = np.asarray(flow_BxHxWx2)
  out = np.zeros(cell_centre_BxKx2.shape, np.float32)
  for bi in range(flow.shape[0]):
    for ki, (cx, cy) in enumerate(np.asarray(cell_centre_BxKx2[bi])):
      x0, y0 = int(round(cx - (size - 1) / 2)), int(round(cy - (size - 1) / 2))
      out[bi, ki] = flow[bi, y0:y0 + size, x0:x0 + size].reshape(-1, 2).mean(0)
  return out
