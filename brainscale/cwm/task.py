"""Task seams of the CWM family: the tokenizer (`cwm.TokenizerTask`) and the world model (`cwm`).

The world model trains on frame pairs: its frozen tokenizer (a prerequisite
run, see `Task.prerequisites`) turns them into codes on the device, the codes
become a pointer/content sequence in a fresh random patch order, and the loss
is next-token cross-entropy on the content tokens. Its evaluation adds the
counterfactual probes: next-frame prediction against the copy-frame baseline
and KL-traced flow against ground truth on held-out synthetic clips.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from brainscale import config as config_lib
from brainscale import nn
from brainscale.cwm import counterfactual, data, sequence, tracking
from brainscale.cwm import model as world_model
from brainscale.cwm import tokenizer as tokenizer_lib
from brainscale.cwm.model import WorldModel
from brainscale.cwm.tokenizer import Tokenizer, psnr
from brainscale.train import task
from brainscale.train.prerequisites import Prerequisite


def _weights(module: nnx.Module) -> int:
  """Matmul/conv weights (ndim >= 2) of a module built under eval_shape."""
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
             if len(v.shape) >= 2)


def _skipped(batch) -> dict:
  if 'skipped' not in batch:
    return {}
  return {'data_skipped': jnp.sum(batch['skipped']).astype(jnp.float32)}


class _VideoTask(task.Task, task.Costs):
  """Train/eval data of a video task; `frames` per example."""
  frames = 2

  def _data(self, directory, *, train, seed, batch_size, process_index, process_count,
            with_flow=False):
    return data.pipeline(self.config, directory, frames=self.frames, train=train, seed=seed,
                         batch_size=batch_size, process_index=process_index,
                         process_count=process_count, with_flow=with_flow)

  def batch_shapes(self, batch_size):
    size = self.config.data.size
    return {'frames': jax.ShapeDtypeStruct((batch_size, self.frames, size, size, 3), jnp.uint8),
            'skipped': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def synthetic_batch(self, batch_size, seed=0):
    shapes = self.batch_shapes(batch_size)
    frames = np.random.default_rng(seed).integers(0, 256, shapes['frames'].shape, dtype=np.uint8)
    return {'frames': frames, 'skipped': np.zeros((batch_size,), np.int32)}

  def train_data(self, process_index, process_count):
    c = self.config
    return iter(self._data(data.train_directory(c), train=True, seed=c.seed,
                           batch_size=c.train.batch_size, process_index=process_index,
                           process_count=process_count))

  def eval_data(self, process_index, process_count):
    c = self.config
    it = iter(self._data(data.eval_directory(c), train=False, seed=c.seed + 1,
                         batch_size=c.train.batch_size, process_index=process_index,
                         process_count=process_count))
    return [next(it) for _ in range(c.train.eval_batches)]


class TokenizerTask(_VideoTask):
  """The local patch quantizer, trained on single frames to reconstruct them."""
  frames = 1

  def model(self, rngs):
    return Tokenizer(config_lib.typed(tokenizer_lib.Spec, self.config.model), rngs=rngs)

  def loss(self, model, batch, rng, train):
    del rng, train
    loss, metrics = model.loss(batch['frames'][:, 0])
    return loss, {**metrics, **_skipped(batch)}

  def flops_per_example(self) -> float:
    model = nnx.eval_shape(lambda: self.model(nnx.Rngs(0)))
    positions = (self.config.data.size // self.config.model.patch) ** 2
    return 6 * _weights(model) * positions

  def activation_bytes(self, examples_per_device: int) -> int:
    m = self.config.model
    positions = examples_per_device * (self.config.data.size // m.patch) ** 2
    return positions * m.channels * (4 * m.depth + 4) * 4


class Task(_VideoTask):
  """The pointer-token world model on frame pairs."""

  def __init__(self, config):
    super().__init__(config)
    c = config
    self.layout = sequence.Layout(c.data.size, c.data.size, codebook=2 ** c.tokenizer.model.bits,
                                  patch=c.sequence.patch, code_px=c.tokenizer.model.patch)

  def model(self, rngs):
    c = self.config
    return WorldModel(config_lib.typed(world_model.Spec, c.model),
                      config_lib.typed(tokenizer_lib.Spec, c.tokenizer.model, 'tokenizer.model'),
                      self.layout, rngs=rngs)

  def tokens_per_example(self):
    return self.layout.length

  def prerequisites(self):
    """With tokenizer.experiment: that run, trained in WORKDIR/tokenizer, frozen."""
    t = self.config.tokenizer
    if not t.experiment:
      return {}
    tok_config = config_lib.resolve(t.experiment, list(t.overrides))
    return {'tokenizer': Prerequisite(tok_config, os.path.abspath(t.workdir) if t.workdir
                                      else 'tokenizer')}

  def loss(self, model, batch, rng, train):
    c, layout = self.config, self.layout
    if batch['frames'].shape[2:4] != (layout.height, layout.width):
      h, w = batch['frames'].shape[2:4]
      raise ValueError(f'frames of {h}x{w} pixels; this model is built for data.size={c.data.size}')
    codes_BxFxhxw = model.tokenize(batch['frames'])
    b = codes_BxFxhxw.shape[0]
    order_key, reveal_key = jax.random.split(rng)
    order_BxN = sequence.random_order(order_key, b, layout)
    seq = sequence.build(codes_BxFxhxw, order_BxN, layout)
    # The whole sequence goes in, so its length stays a multiple of 128 (no padding in the
    # attention kernels or the sequence sharding); position i predicts token i + 1, and the
    # last position, which predicts nothing, weighs 0.
    x_BxLxD = model.features(seq.tokens_BxL, seq.pos_BxLx3)
    next_ = lambda a_BxL: jnp.pad(a_BxL[:, 1:], ((0, 0), (0, 1)))
    nll_BxL = nn.chunked_cross_entropy(x_BxLxD, model.output_weights(), next_(seq.tokens_BxL),
                                       chunk=c.model.loss_chunk)
    most = int(c.sequence.reveal * layout.patches)
    revealed_B = jax.random.randint(reveal_key, (b,), 0, most + 1) if most else None
    w_BxL = next_(sequence.loss_weights(seq, layout, frame0_weight=c.sequence.frame0_weight,
                                        revealed_B=revealed_B))
    loss = jnp.sum(nll_BxL * w_BxL) / jnp.maximum(jnp.sum(w_BxL), 1.0)
    content_BxL, frame_BxL = next_(seq.content_BxL), next_(seq.frame_BxL)
    metrics = {'loss': loss,
               'nll_frame0': nn.masked_mean(nll_BxL, content_BxL & (frame_BxL == 0)),
               'nll_frame1': nn.masked_mean(nll_BxL, content_BxL & (frame_BxL == 1)),
               **_skipped(batch)}
    return loss, metrics

  def evaluate(self, model):
    """Probes on held-out synthetic clips with ground-truth flow (see module docstring)."""
    c = self.config
    tracked = self._tracking(model) if c.probe.tracking_videos else {}
    if not c.probe.clips:
      return tracked
    it = iter(self._data(data.eval_directory(c), train=False, seed=c.seed + 2,
                         batch_size=c.probe.batch * jax.process_count(),
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         with_flow=True))
    rng = np.random.default_rng(c.seed)
    results = []
    for _ in range(max(c.probe.clips // c.probe.batch, 1)):
      batch = next(it)
      results.append(self._probe(model, batch, rng))
    return {**{k: float(np.mean([r[k] for r in results])) for k in results[0]}, **tracked}

  def _tracking(self, model) -> dict:
    """TAP-Vid AJ, <δ_avg and OA (x100) of KL-tracing on the synthetic tracking set, and of
    the zero-motion baseline, under probe.tracking_protocol (cwm/tracking.py)."""
    c = self.config
    videos = tracking.synthetic_set(c, c.probe.tracking_videos, c.probe.tracking_tracks)
    protocol = c.probe.tracking_protocol
    short = {'average_jaccard': 'aj', 'average_pts_within_thresh': 'pts_within',
             'occlusion_accuracy': 'oa'}
    out = {}
    for name, method in (('tracking', tracking.kl_tracker(
        model, c.data.size, orders=c.probe.flow_orders, occlusion_kl=c.probe.occlusion_kl,
        seed=c.seed)), ('tracking_zero_motion', tracking.zero_motion)):
      scores = tracking.evaluate(method, videos, protocol, batch=c.probe.batch,
                                 points=c.probe.flow_points)
      out |= {f'{name}_{short[k]}': v for k, v in scores.items() if k in short}
    return out

  def _probe(self, model, batch, rng) -> dict:
    c, layout = self.config, self.layout
    frames = jnp.asarray(batch['frames'])
    b, p = frames.shape[0], layout.patches
    reveal = int(round(c.probe.reveal * p))
    revealed_BxR = np.stack([rng.permutation(p)[:reveal] for _ in range(b)]).astype(np.int32)
    out = _probe_frames(model, frames, jnp.asarray(revealed_BxR))
    points_BxKx2 = _flow_points(np.asarray(batch['flow']), batch.get('visible'),
                                c.probe.flow_points, c.probe.min_motion, layout, rng)
    flow = _kl_flow(model, frames, jnp.asarray(points_BxKx2), c.probe.flow_orders)
    gt_BxKx2 = counterfactual.cell_flow(batch['flow'], np.asarray(flow['cell_centre']),
                                        layout.code_px)
    epe = np.linalg.norm(np.asarray(flow['flow']) - gt_BxKx2, axis=-1)
    return {**{k: float(np.mean(v)) for k, v in jax.device_get(out).items()},
            'flow_epe': float(epe.mean()),
            'zero_flow_epe': float(np.linalg.norm(gt_BxKx2, axis=-1).mean())}

  def flops_per_example(self) -> float:
    c, layout = self.config, self.layout
    m = c.model
    model = nnx.eval_shape(lambda: self.model(nnx.Rngs(0)))
    t = layout.length
    matmuls = _weights(model.blocks) + _weights(model.head)
    attention = 6 * m.layers * t * t * m.heads * m.head_dim  # causal: half of 12 L T^2 d
    tokenizer = 2 * _weights(model.tokenizer) * layout.frames * (c.data.size // layout.code_px) ** 2
    return 6 * matmuls * t + attention + tokenizer

  def activation_bytes(self, examples_per_device: int) -> int:
    m, t = self.config.model, self.layout.length
    return nn.stack_activation_bytes(
        layers=m.layers, tokens=examples_per_device * t, dim=m.dim, mlp_hidden=m.mlp_hidden,
        heads=m.heads, seq=t, remat=m.remat, dense_scores=m.attention == 'xla')


@nnx.jit
def _probe_frames(model, frames_Bx2xHxWx3, revealed_BxR):
  """tokenizer_psnr, copy_frame_psnr and next_frame_psnr (hidden pixels) per clip."""
  target_BxHxWx3 = frames_Bx2xHxWx3[:, 1].astype(jnp.float32) / 255
  codes_Bx2xhxw = model.tokenize(frames_Bx2xHxWx3)
  tok = model.tokenizer
  pred = counterfactual.predict_codes(model, codes_Bx2xhxw, revealed_BxR, decode='mean')
  copy_BxHxWx3 = tok.detokenize(codes_Bx2xhxw[:, 0])
  return {'tokenizer_psnr': psnr(tok.detokenize(codes_Bx2xhxw[:, 1]), target_BxHxWx3),
          'copy_frame_psnr': counterfactual.masked_psnr(copy_BxHxWx3, target_BxHxWx3,
                                                        pred['hidden']),
          'next_frame_psnr': counterfactual.masked_psnr(pred['image'], target_BxHxWx3,
                                                        pred['hidden'])}


@functools.partial(nnx.jit, static_argnums=3)
def _kl_flow(model, frames, points, orders):
  return counterfactual.kl_flow(model, frames, points, orders=orders)


def _flow_points(flow_BxHxWx2, visible_BxHxW, k: int, min_motion: float, layout,
                 rng) -> np.ndarray:
  """k points per clip at code-cell centres, among cells that move >= `min_motion` pixels.

  Cells whose ground truth is occluded (when `visible` is known) are not used.
  """
  b, h, w, _ = flow_BxHxWx2.shape
  s = layout.code_px
  cell_flow = flow_BxHxWx2.reshape(b, h // s, s, w // s, s, 2).mean((2, 4))
  moving = np.linalg.norm(cell_flow, axis=-1) >= min_motion
  if visible_BxHxW is not None:
    moving &= np.asarray(visible_BxHxW).reshape(b, h // s, s, w // s, s).all((2, 4))
  points = np.zeros((b, k, 2), np.float32)
  for i in range(b):
    cells = np.argwhere(moving[i])
    if len(cells) == 0:  # nothing moves that far: the fastest cells
      speed = np.linalg.norm(cell_flow[i], axis=-1)
      cells = np.argwhere(speed >= np.sort(speed.reshape(-1))[-k])
    pick = cells[rng.choice(len(cells), k, replace=len(cells) < k)]
    points[i] = np.stack([s * pick[:, 1] + (s - 1) / 2, s * pick[:, 0] + (s - 1) / 2], -1)
  return points
