"""Enigma's input tokens: neuron traces, video tubelets and behaviour channels.

Every token carries a time in samples (its centre) for the rotary embedding
and a validity flag: a token whose samples are all hidden or missing is not
attended to. Hidden samples enter as zeros plus a 0/1 'seen' channel.

Shape suffixes: W samples of a window, M neurons, S token times of a trace or tubelet
times of a video, K samples a neuron token spans, G grid cells, P pixels of a tubelet,
H x X frame pixels (height, width), C behaviour channels, E neuron embedding, D model dim.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from brainscale import nn
from brainscale.parallel import EMBED


def _spans(length: int, kernel: int, stride: int) -> jax.Array:
  """Sample indices [S, kernel] of each strided window."""
  if kernel > length:
    raise ValueError(f'token kernel {kernel} is longer than the window of {length} samples')
  starts_S = stride * jnp.arange((length - kernel) // stride + 1)
  return starts_S[:, None] + jnp.arange(kernel)


class NeuronTokens(nnx.Module):
  """Strided 1D conv over each neuron's trace + the neuron's identity embedding."""

  def __init__(self, dim: int, identity_dim: int, *, kernel: int, stride: int, rngs: nnx.Rngs):
    self.w_conv_Kx2xD = nn.param(rngs, (kernel, 2, dim), (None, None, EMBED), fan_in=2 * kernel)
    self.w_identity_ExD = nn.param(rngs, (identity_dim, dim), (None, EMBED))
    self.kernel, self.stride = kernel, stride

  def __call__(self, trace_BxWxM, seen_BxWxM, identity_BxMxE):
    """Tokens [B, M*S, D], valid [B, M*S], times [S] (repeated per neuron)."""
    b, w, m = trace_BxWxM.shape
    span_SxK = _spans(w, self.kernel, self.stride)
    x_BxWxMx2 = jnp.stack([jnp.where(seen_BxWxM, trace_BxWxM, 0), seen_BxWxM], -1)
    x_BxSxKxMx2 = x_BxWxMx2[:, span_SxK].astype(self.w_conv_Kx2xD.dtype)
    tok_BxMxSxD = jnp.einsum('bskmc,kcd->bmsd', x_BxSxKxMx2, self.w_conv_Kx2xD[...])
    ident_BxMxD = jnp.einsum('bme,ed->bmd', identity_BxMxE, self.w_identity_ExD[...])
    tok_BxMxSxD = tok_BxMxSxD + ident_BxMxD[:, :, None]
    valid_BxMxS = jnp.any(seen_BxWxM[:, span_SxK], axis=2).transpose(0, 2, 1)
    s = span_SxK.shape[0]
    times_S = span_SxK.mean(1).astype(jnp.float32)
    return (tok_BxMxSxD.reshape(b, m * s, -1), valid_BxMxS.reshape(b, m * s),
            jnp.tile(times_S, m))


class VideoTokens(nnx.Module):
  """Spatiotemporal patches (tubelets) of grayscale frames -> tokens."""

  def __init__(self, dim: int, frame_shape: tuple, patch: tuple, *, rngs: nnx.Rngs):
    pt, ph, pw = patch
    h, w = frame_shape
    if h % ph or w % pw:
      raise ValueError(f'video patch {ph}x{pw} does not tile frames of {h}x{w}')
    self.grid = (h // ph, w // pw)
    self.patch = tuple(patch)
    self.w_patch_PxD = nn.param(rngs, (pt * ph * pw, dim), (None, EMBED))
    # as large as the content (std 1), so queries can select places from the start
    self.w_where_GxD = nn.param(rngs, (self.grid[0] * self.grid[1], dim), (None, EMBED),
                                fan_in=1)

  def __call__(self, frames_BxWxHxX, seen_BxW):
    """Tokens [B, S*G, D], valid [B, S*G], times [S*G]; G patches per tubelet time."""
    pt, ph, pw = self.patch
    b, w = frames_BxWxHxX.shape[:2]
    s = w // pt
    gh, gw = self.grid
    x = (frames_BxWxHxX[:, :s * pt].astype(jnp.float32) / 255.0 - 0.5) * 4.0
    x = x.reshape(b, s, pt, gh, ph, gw, pw).transpose(0, 1, 3, 5, 2, 4, 6)
    x_BxSxGxP = x.reshape(b, s, gh * gw, pt * ph * pw).astype(self.w_patch_PxD.dtype)
    seen_BxS = seen_BxW[:, :s * pt].reshape(b, s, pt).any(-1)
    x_BxSxGxP = jnp.where(seen_BxS[..., None, None], x_BxSxGxP, 0)
    tok_BxSxGxD = jnp.einsum('bsgp,pd->bsgd', x_BxSxGxP, self.w_patch_PxD[...])
    tok_BxSxGxD = tok_BxSxGxD + self.w_where_GxD[...]
    times_S = pt * jnp.arange(s, dtype=jnp.float32) + (pt - 1) / 2
    valid_BxSxG = jnp.broadcast_to(seen_BxS[..., None], (b, s, gh * gw))
    return (tok_BxSxGxD.reshape(b, s * gh * gw, -1), valid_BxSxG.reshape(b, -1),
            jnp.repeat(times_S, gh * gw))


class BehaviorTokens(nnx.Module):
  """One token per behaviour channel per window: the channel's whole trace, projected."""

  def __init__(self, dim: int, channels: int, window: int, *, rngs: nnx.Rngs):
    self.w_trace_Cx2WxD = nn.param(rngs, (channels, 2 * window, dim), (None, None, EMBED),
                                   fan_in=2 * window)
    self.w_channel_CxD = nn.param(rngs, (channels, dim), (None, EMBED), fan_in=dim)

  def __call__(self, behavior_BxWxC, seen_BxWxC):
    """Tokens [B, C, D], valid [B, C], times [C] (the window centre)."""
    w = behavior_BxWxC.shape[1]
    x_BxCx2W = jnp.concatenate([jnp.where(seen_BxWxC, behavior_BxWxC, 0), seen_BxWxC],
                               1).transpose(0, 2, 1).astype(self.w_trace_Cx2WxD.dtype)
    tok_BxCxD = jnp.einsum('bcw,cwd->bcd', x_BxCx2W, self.w_trace_Cx2WxD[...])
    tok_BxCxD = tok_BxCxD + self.w_channel_CxD[...]
    c = behavior_BxWxC.shape[2]
    return tok_BxCxD, seen_BxWxC.any(1), jnp.full((c,), (w - 1) / 2, jnp.float32)
