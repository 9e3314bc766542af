"""Enigma: a PerceiverIO-style transformer over neurons, stimulus and behaviour.

Latents read the neuron tokens by cross-attention; video and behaviour tokens
join the latents in a tower of shared Blocks (RoPE on time, RMSNorm, QK-norm,
SwiGLU, local sliding-window layers with a global one every `global_every`);
a decoder answers neuron and behaviour queries by cross-attention. Each neuron's
query also carries a Gaussian readout of the video encoder's grid at the neuron's
receptive field, placed by its cortical position and identity. All shared
weights live under `core`; per-neuron, per-session and per-animal embeddings
sit beside it, so a new session is fitted with the core frozen.

Shape suffixes (nn/__init__.py's key, and here):
  M neurons of a window       J neuron tokens          V video tokens
  C behaviour channels        L latents                X tower tokens (L + V + C)
  G video grid cells          U video tubelets         K tubelets a bin reads
  T bins of a window          S samples per bin        W samples of a window (T x S)
  Q query rows (neurons or channels), Z = Q x T       E neuron embedding
  F place frequencies         P place features (6 F)   R RF inputs (3 + P)
Parameter attribute names are checkpoint paths and keep the letters they were saved
with: in `session_SxD` S counts sessions, in `neuron_NxE` N all neurons of the
store, and in `w_rf_Px2` P is R; nn.Mask's keywords keep nn's letters (kv_valid_BxS).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from brainscale import nn, parallel
from brainscale.enigma import tokens
from brainscale.enigma.masking import Masks
from brainscale.parallel import EMBED, WHOLE

NEURONS = 'neurons'   # logical axis of the per-neuron table (mesh.rules.neurons, _enigma.py)
PLACE_FREQUENCIES = (0.25, 0.5, 1.0)  # cycles per std of a session's neuron positions


def place_features(positions_BxMx3: jax.Array) -> jax.Array:
  """sin and cos of 2 pi f x for each frequency f and axis: [B, M, 6 F]."""
  f_F = jnp.asarray(PLACE_FREQUENCIES, jnp.float32)
  angle_BxMx3xF = 2 * jnp.pi * positions_BxMx3.astype(jnp.float32)[..., None] * f_F
  b, m = positions_BxMx3.shape[:2]
  return jnp.concatenate([jnp.sin(angle_BxMx3xF), jnp.cos(angle_BxMx3xF)], -1).reshape(b, m, -1)


class _Group(nnx.Module):
  """`size` Blocks: local attention in all but the last, which is global."""

  def __init__(self, make_block, size: int, rngs: nnx.Rngs):
    self.blocks = nnx.List([make_block(rngs) for _ in range(size)])

  def __call__(self, x_BxXxD, *, local: nn.Mask, global_: nn.Mask, rope: nn.Rotary):
    for i, block in enumerate(self.blocks):
      mask = global_ if i == len(self.blocks) - 1 else local
      x_BxXxD = block(x_BxXxD, mask=mask, rope_q=rope, rope_k=rope)
    return x_BxXxD


@dataclasses.dataclass(frozen=True)
class Spec:
  """What Enigma is built from (config.typed(Spec, config.model)); table sizes come apart."""
  dim: int
  layers: int             # tower layers
  heads: int
  head_dim: int
  mlp_hidden: int         # SwiGLU hidden width
  qk_norm: bool
  global_every: int       # every k-th tower layer attends globally, the rest locally
  local_window: float     # seconds either side, for the local layers
  rope_base: float
  neuron_dim: int         # per-neuron embedding width
  neuron_kernel: int      # strided conv over each neuron's trace
  neuron_stride: int
  video_patch: tuple      # tubelet: frames x pixels x pixels
  video_layers: int
  latents_per_step: int
  latent_stride: int      # samples between latent time steps
  decoder_layers: int
  decode_stride: int      # samples between a neuron's queries
  readout_seconds: float  # stimulus history each neuron's query reads
  softplus_beta: float
  attention: str          # an nn attention backend
  remat: str              # a name in nn.REMAT_POLICIES


class Core(nnx.Module):
  """Everything shared across neurons, sessions and animals."""

  def __init__(self, c: Spec, *, window: int, rate: float, channels: int, frame_shape: tuple,
               rngs: nnx.Rngs):
    if c.layers % c.global_every:
      raise ValueError(f'model.layers={c.layers} is not a multiple of '
                       f'model.global_every={c.global_every}')
    if window % c.decode_stride or window % c.latent_stride:
      raise ValueError(f'a window of {window} samples does not split into '
                       f'decode_stride={c.decode_stride} / latent_stride={c.latent_stride} bins')

    def block(r, kv_dim=0):
      return nn.Block(c.dim, c.heads, c.head_dim, c.mlp_hidden, mlp='swiglu', qk_norm=c.qk_norm,
                      kv_dim=kv_dim, backend=c.attention, rngs=r)

    self.neuron_tokens = tokens.NeuronTokens(c.dim, c.neuron_dim, kernel=c.neuron_kernel,
                                             stride=c.neuron_stride, rngs=rngs)
    self.video_tokens = tokens.VideoTokens(c.dim, frame_shape, tuple(c.video_patch), rngs=rngs)
    self.behavior_tokens = tokens.BehaviorTokens(c.dim, channels, window, rngs=rngs)
    self.video = nn.Stack(block, c.video_layers, remat=c.remat, rngs=rngs)
    latents = (window // c.latent_stride) * c.latents_per_step
    self.latents_LxD = nn.param(rngs, (latents, c.dim), (None, EMBED), fan_in=c.dim)
    self.read = block(rngs)
    self.tower = nn.Stack(lambda r: _Group(block, c.global_every, r),
                          c.layers // c.global_every, remat=c.remat, rngs=rngs)
    self.norm = nn.RMSNorm(c.dim, rngs=rngs)
    self.w_query_ExD = nn.param(rngs, (c.neuron_dim, c.dim), (None, EMBED))
    # Where a neuron sits in cortex says where its receptive field is (retinotopy):
    # Fourier features of its position enter its query, one map shared by all neurons.
    self.w_place_PxD = nn.param(rngs, (6 * len(PLACE_FREQUENCIES), c.dim), (None, EMBED))
    self.w_channel_CxD = nn.param(rngs, (channels, c.dim), (None, EMBED), fan_in=c.dim)
    # A Gaussian readout (Lurz et al. 2021): each neuron weighs the video encoder's grid
    # by a Gaussian at its receptive field, placed from its cortical position (retinotopy,
    # shared) and identity; the weighted features of the last `readout_seconds` join its
    # query at each bin. Cross-attention alone mixes places by their content, which blurs
    # the phase-sensitive drive of simple cells.
    places = 3 + 6 * len(PLACE_FREQUENCIES)
    self.w_rf_Px2 = nn.param(rngs, (places, 2), (None, None), init='zeros')
    self.w_rf_Ex2 = nn.param(rngs, (c.neuron_dim, 2), (None, None), init='zeros')
    self.log_rf_width = nn.param(rngs, (), (), init='zeros')   # Gaussian std, in grid cells
    pt = c.video_patch[0]
    self.readout_tubelets = -(-(c.decode_stride + round(c.readout_seconds * rate)) // pt)
    self.w_readout_KxDxD = nn.param(rngs, (self.readout_tubelets, c.dim, c.dim),
                                    (None, EMBED, None), fan_in=self.readout_tubelets * c.dim)
    self.decoder = nn.Stack(block, c.decoder_layers, remat=c.remat, rngs=rngs)
    self.decoder_norm = nn.RMSNorm(c.dim, rngs=rngs)
    # Readouts: a neuron's weights are a shared part plus one made from its embedding,
    # so each neuron reads its own features (as a per-neuron linear readout would).
    self.w_rate_DxS = nn.param(rngs, (c.dim, c.decode_stride), (EMBED, None))
    self.w_rate_ExDxS = nn.param(rngs, (c.neuron_dim, c.dim, c.decode_stride),
                                 (None, EMBED, None), fan_in=c.neuron_dim * c.dim)
    self.w_bias_ExS = nn.param(rngs, (c.neuron_dim, c.decode_stride), (None, None))
    self.w_behavior_CxDxS = nn.param(rngs, (channels, c.dim, c.decode_stride),
                                     (None, EMBED, None), fan_in=c.dim)
    self.bins = window // c.decode_stride
    self.local_window = c.local_window * rate  # seconds -> samples
    self.c = c

  def _rope(self, times_BxT):
    return nn.rope_1d(times_BxT, self.c.head_dim, base=self.c.rope_base)

  def encode(self, batch: dict, masks: Masks, identity_BxMxE, context_BxD):
    """Tower output [B, X, D], its validity [B, X], times [X] (samples), and the video
    encoder's output [B, V, D] with its validity [B, V] (for the readout)."""
    c = self.c
    b = batch['frames'].shape[0]
    neuron_BxJxD, neuron_ok_BxJ, neuron_t_J = self.neuron_tokens(
        batch['responses'], masks.neuron_in_BxWxM, identity_BxMxE)
    neuron_BxJxD = neuron_BxJxD + context_BxD[:, None]
    video_BxVxD, video_ok_BxV, video_t_V = self.video_tokens(batch['frames'],
                                                             batch['frames_mask'])
    video_rope = self._rope(jnp.broadcast_to(video_t_V, video_ok_BxV.shape))
    video_BxVxD = self.video(video_BxVxD, mask=nn.Mask(kv_valid_BxS=video_ok_BxV),
                             rope_q=video_rope, rope_k=video_rope)
    behav_BxCxD, behav_ok_BxC, behav_t_C = self.behavior_tokens(batch['behavior'],
                                                                masks.behavior_in_BxWxC)

    latents = self.latents_LxD.shape[0]
    steps = latents // c.latents_per_step
    latent_t_L = jnp.repeat(c.latent_stride * jnp.arange(steps) + (c.latent_stride - 1) / 2,
                            c.latents_per_step).astype(jnp.float32)
    x_BxLxD = jnp.broadcast_to(self.latents_LxD[...], (b,) + self.latents_LxD.shape)
    x_BxLxD = x_BxLxD + context_BxD[:, None].astype(x_BxLxD.dtype)
    x_BxLxD = self.read(x_BxLxD, neuron_BxJxD.astype(x_BxLxD.dtype),
                        mask=nn.Mask(kv_valid_BxS=neuron_ok_BxJ),
                        rope_q=self._rope(jnp.broadcast_to(latent_t_L, (b, latents))),
                        rope_k=self._rope(jnp.broadcast_to(neuron_t_J, neuron_ok_BxJ.shape)))

    x_BxXxD = jnp.concatenate([x_BxLxD, video_BxVxD.astype(x_BxLxD.dtype),
                               behav_BxCxD.astype(x_BxLxD.dtype)], 1)
    x_BxXxD = parallel.constrain(x_BxXxD, WHOLE)
    ok_BxX = jnp.concatenate([jnp.ones((b, latents), bool), video_ok_BxV, behav_ok_BxC], 1)
    t_X = jnp.concatenate([latent_t_L, video_t_V, behav_t_C])
    t_BxX = jnp.broadcast_to(t_X, ok_BxX.shape)
    local = nn.Mask(window=self.local_window, q_pos_BxT=t_BxX, kv_pos_BxS=t_BxX,
                    kv_valid_BxS=ok_BxX)
    x_BxXxD = self.tower(x_BxXxD, local=local, global_=nn.Mask(kv_valid_BxS=ok_BxX),
                         rope=self._rope(t_BxX))
    return self.norm(x_BxXxD), ok_BxX, t_X, (video_BxVxD, video_ok_BxV)

  def _gaussian(self, rf_in_BxMxR, identity_BxMxE):
    """Normalised weights [B, M, G] of a Gaussian over the video grid at each neuron's RF."""
    gh, gw = self.video_tokens.grid
    cell_Gx2 = jnp.stack(jnp.meshgrid((jnp.arange(gw) + 0.5) / gw, (jnp.arange(gh) + 0.5) / gh),
                         -1).reshape(-1, 2) * 2 - 1   # (x, y) in [-1, 1]
    rf_BxMx2 = jnp.tanh(
        jnp.einsum('bmr,rc->bmc', rf_in_BxMxR.astype(jnp.float32), self.w_rf_Px2[...]) +
        jnp.einsum('bme,ec->bmc', identity_BxMxE.astype(jnp.float32), self.w_rf_Ex2[...]))
    width_2 = 2 * jnp.exp(self.log_rf_width[...]) / jnp.array([gw, gh], jnp.float32)
    d2_BxMxG = (((rf_BxMx2[:, :, None] - cell_Gx2) / width_2) ** 2).sum(-1)
    return jax.nn.softmax(-0.5 * d2_BxMxG, -1)

  def readout(self, video_BxVxD, video_ok_BxV, rf_in_BxMxR, identity_BxMxE):
    """Each neuron's Gaussian-weighted video features over its last tubelets, per bin:
    [B, M, T, D]. Reads the video encoder's output, which keeps the stimulus' linear
    detail better than the tower's (benchmarks/RESULTS.md, "Enigma tiny on CPU")."""
    c = self.c
    b, pt = video_BxVxD.shape[0], c.video_patch[0]
    g = self.video_tokens.grid[0] * self.video_tokens.grid[1]
    u = video_BxVxD.shape[1] // g   # tubelets per window
    video_BxUxGxD = jnp.where(video_ok_BxV.reshape(b, u, g)[..., None],
                              video_BxVxD.reshape(b, u, g, -1), 0)
    mask_BxMxG = self._gaussian(rf_in_BxMxR, identity_BxMxE).astype(video_BxVxD.dtype)
    read_BxMxUxD = jnp.einsum('bmg,bugd->bmud', mask_BxMxG, video_BxUxGxD)
    # bin t ends in tubelet last[t]; it reads that one and the K - 1 before it
    last_T = (c.decode_stride * jnp.arange(self.bins) + c.decode_stride - 1) // pt
    tubelet_TxK = last_T[:, None] - jnp.arange(self.readout_tubelets)
    read_BxMxTxKxD = jnp.where((tubelet_TxK >= 0)[..., None],
                               read_BxMxUxD[:, :, jnp.maximum(tubelet_TxK, 0)], 0)
    return jnp.einsum('bmtkd,kde->bmte', read_BxMxTxKxD, self.w_readout_KxDxD[...])

  def decode(self, x_BxXxD, ok_BxX, t_X, queries_BxQxTxD):
    """Features [B, Q, T, D] answering each query row (a neuron or a channel) at each bin."""
    c = self.c
    b, q = queries_BxQxTxD.shape[:2]
    bins_T = c.decode_stride * jnp.arange(self.bins) + (c.decode_stride - 1) / 2
    q_BxZxD = queries_BxQxTxD.reshape(b, q * self.bins, -1).astype(x_BxXxD.dtype)
    q_t_BxZ = jnp.broadcast_to(jnp.tile(bins_T.astype(jnp.float32), q), q_BxZxD.shape[:2])
    y_BxZxD = self.decoder(q_BxZxD, x_BxXxD, mask=nn.Mask(kv_valid_BxS=ok_BxX),
                           rope_q=self._rope(q_t_BxZ),
                           rope_k=self._rope(jnp.broadcast_to(t_X, ok_BxX.shape)))
    return self.decoder_norm(y_BxZxD).reshape(b, q, self.bins, -1)

  def __call__(self, batch: dict, masks: Masks, identity_BxMxE, context_BxD):
    """Rates [B, W, M] (softplus with slope `softplus_beta`) and behaviour [B, W, C]."""
    x_BxXxD, ok_BxX, t_X, video = self.encode(batch, masks, identity_BxMxE, context_BxD)
    c, dtype = self.c, x_BxXxD.dtype
    b, m = identity_BxMxE.shape[:2]
    identity_BxMxE, context_BxD = identity_BxMxE.astype(dtype), context_BxD.astype(dtype)
    place_BxMxP = place_features(batch['positions']).astype(dtype)
    neuron_BxMxD = (jnp.einsum('bme,ed->bmd', identity_BxMxE, self.w_query_ExD[...]) +
                    jnp.einsum('bmp,pd->bmd', place_BxMxP, self.w_place_PxD[...]) +
                    context_BxD[:, None])
    rf_in_BxMxR = jnp.concatenate([batch['positions'].astype(dtype), place_BxMxP], -1)
    neuron_BxMxTxD = neuron_BxMxD[:, :, None] + self.readout(*video, rf_in_BxMxR,
                                                             identity_BxMxE)
    channel_BxCxD = self.w_channel_CxD[...][None] + context_BxD[:, None]
    channel_BxCxTxD = jnp.broadcast_to(channel_BxCxD[:, :, None],
                                       channel_BxCxD.shape[:2] + (self.bins, c.dim))
    y_BxMxTxD = self.decode(x_BxXxD, ok_BxX, t_X, neuron_BxMxTxD)
    w_BxMxDxS = self.w_rate_DxS[...] + jnp.einsum('bme,eds->bmds', identity_BxMxE,
                                                  self.w_rate_ExDxS[...])
    drive_BxMxTxS = (jnp.einsum('bmtd,bmds->bmts', y_BxMxTxD, w_BxMxDxS,
                                preferred_element_type=jnp.float32) +
                     jnp.einsum('bme,es->bms', identity_BxMxE, self.w_bias_ExS[...],
                                preferred_element_type=jnp.float32)[:, :, None])
    y_BxCxTxD = self.decode(x_BxXxD, ok_BxX, t_X, channel_BxCxTxD)
    behavior_BxCxTxS = jnp.einsum('bctd,cds->bcts', y_BxCxTxD, self.w_behavior_CxDxS[...],
                                  preferred_element_type=jnp.float32)
    beta = c.softplus_beta
    rates_BxMxW = jax.nn.softplus(beta * drive_BxMxTxS.reshape(b, m, -1)) / beta
    behavior_BxCxW = behavior_BxCxTxS.reshape(b, behavior_BxCxTxS.shape[1], -1)
    return rates_BxMxW.transpose(0, 2, 1), behavior_BxCxW.transpose(0, 2, 1)


class Enigma(nnx.Module):
  """The core plus per-neuron, per-session and per-animal embeddings."""

  def __init__(self, c: Spec, *, neurons: int, sessions: int, animals: int, window: int,
               rate: float, channels: int, frame_shape: tuple, rngs: nnx.Rngs):
    self.core = Core(c, window=window, rate=rate, channels=channels, frame_shape=frame_shape,
                     rngs=rngs)
    self.neuron_NxE = nn.param(rngs, (neurons, c.neuron_dim), (NEURONS, None), fan_in=1)
    self.session_SxD = nn.param(rngs, (sessions, c.dim), (None, EMBED), fan_in=c.dim)
    self.animal_AxD = nn.param(rngs, (animals, c.dim), (None, EMBED), fan_in=c.dim)

  def __call__(self, batch: dict, masks: Masks):
    identity_BxMxE = jnp.take(self.neuron_NxE[...], batch['neurons'], axis=0)
    context_BxD = (jnp.take(self.session_SxD[...], batch['session'], axis=0) +
                   jnp.take(self.animal_AxD[...], batch['animal'], axis=0))
    return self.core(batch, masks, identity_BxMxE, context_BxD)
