"""The local patch quantizer (LRAS-style): one discrete code per patch x patch pixels.

A small conv autoencoder whose receptive field stays local (kernel=1: each code
sees only its own block), quantized without a codebook lookup: LFQ (each of
`bits` channels -> +-1) or FSQ (bits // 2 channels, 4 levels each). Frames are
uint8 (or float in [0, 255]) NHWC; decoded images are float32 in [0, 1].
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from brainscale.config import ConfigError
from brainscale.nn.core import RMSNorm, param

LEVELS = {'lfq': 2, 'fsq': 4}   # levels per latent channel
ENTROPY_INV_TEMPERATURE = 1.0   # LFQ soft bit: softmax of -(z -+ 1)**2 / T = sigmoid(4 z / T)
PSNR_MSE_FLOOR = 1e-10          # identical images score 100 dB, not inf


def psnr(a_BxHxWxC: jax.Array, b_BxHxWxC: jax.Array, max_value: float = 1.0) -> jax.Array:
  """Per-image PSNR in dB [B]; mse over H, W, C, floored at PSNR_MSE_FLOOR."""
  diff = a_BxHxWxC.astype(jnp.float32) - b_BxHxWxC.astype(jnp.float32)
  mse_B = jnp.mean(diff * diff, axis=tuple(range(1, diff.ndim)))
  return 10.0 * jnp.log10(max_value ** 2 / jnp.maximum(mse_B, PSNR_MSE_FLOOR))


def space_to_depth(x_BxHxWxC: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C], each row one p x p block (row-major)."""
  b, hh, ww, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hh // p, ww // p, p * p * c)


def depth_to_space(x_BxhxwxQ: jax.Array, p: int) -> jax.Array:
  """Inverse of space_to_depth."""
  b, h, w, q = x_BxhxwxQ.shape
  x = x_BxhxwxQ.reshape(b, h, w, p, p, q // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, q // (p * p))


def conv(x_BxhxwxC: jax.Array, w_KxKxCxD: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution, NHWC x HWIO."""
  return jax.lax.conv_general_dilated(x_BxhxwxC, w_KxKxCxD, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def histogram_entropy(codes_N: jax.Array) -> jax.Array:
  """Entropy in nats of the empirical distribution of codes_N; sorts, so cost is free of V."""
  n = codes_N.shape[0]
  sorted_N = jnp.sort(codes_N)
  new_run_N = jnp.concatenate([jnp.ones((1,), bool), sorted_N[1:] != sorted_N[:-1]])
  run_N = jnp.cumsum(new_run_N) - 1
  freq_N = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), run_N, num_segments=n) / n
  return -jnp.sum(jnp.where(freq_N > 0, freq_N * jnp.log(jnp.maximum(freq_N, 1e-30)), 0.0))


def bit_entropy(p: jax.Array) -> jax.Array:
  """Entropy in nats of Bernoulli(p), elementwise."""
  eps = 1e-6
  return -(p * jnp.log(p + eps) + (1.0 - p) * jnp.log(1.0 - p + eps))


class ResBlock(nnx.Module):
  """x + w_out gelu(conv_K(norm(x))); kernel 1 keeps every position separate."""

  def __init__(self, channels: int, kernel: int, *, rngs: nnx.Rngs):
    k, c = kernel, channels
    self.norm = RMSNorm(c, rngs=rngs)
    self.w_conv_KxKxCxC = param(rngs, (k, k, c, c), (None,) * 4, fan_in=k * k * c)
    self.w_out_CxC = param(rngs, (c, c), (None, None))

  def __call__(self, x_BxhxwxC: jax.Array) -> jax.Array:
    h_BxhxwxC = jax.nn.gelu(conv(self.norm(x_BxhxwxC), self.w_conv_KxKxCxC[...]))
    return x_BxhxwxC + jnp.einsum('bhwc,cd->bhwd', h_BxhxwxC, self.w_out_CxC[...])


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the Tokenizer is built from (config.typed(Spec, its model section))."""
  patch: int              # pixels per code side
  channels: int
  depth: int              # residual blocks in the encoder and in the decoder
  kernel: int             # conv kernel of the blocks (1: each code sees only its block)
  bits: int               # codebook 2 ** bits
  quantizer: str          # lfq | fsq
  commit_weight: float
  entropy_weight: float


class Tokenizer(nnx.Module):
  """Frames <-> codes [B, H/patch, W/patch] in [0, 2**bits)."""

  def __init__(self, c, *, rngs: nnx.Rngs):
    check_config(c)
    self.patch, self.quantizer, self.bits = c.patch, c.quantizer, c.bits
    self.commit_weight, self.entropy_weight = c.commit_weight, c.entropy_weight
    self.levels = LEVELS[c.quantizer]
    self.latent_channels = c.bits // int(math.log2(self.levels))   # k: channels of a latent
    q, d, k = c.patch * c.patch * 3, c.channels, self.latent_channels
    self.w_patch_QxC = param(rngs, (q, d), (None, None))
    self.enc_blocks = nnx.List([ResBlock(d, c.kernel, rngs=rngs) for _ in range(c.depth)])
    self.enc_norm = RMSNorm(d, rngs=rngs)
    self.w_latent_Cxk = param(rngs, (d, k), (None, None))
    self.w_unlatent_kxC = param(rngs, (k, d), (None, None))
    self.dec_blocks = nnx.List([ResBlock(d, c.kernel, rngs=rngs) for _ in range(c.depth)])
    self.dec_norm = RMSNorm(d, rngs=rngs)
    self.w_unpatch_CxQ = param(rngs, (d, q), (None, None))

  @property
  def vocab(self) -> int:
    return 2 ** self.bits

  @property
  def radius(self) -> int:
    """How many codes away a pixel change can reach (each conv block adds kernel // 2)."""
    kernel = self.enc_blocks[0].w_conv_KxKxCxC.shape[0] if len(self.enc_blocks) else 1
    return len(self.enc_blocks) * (kernel // 2)

  # ------------------------------------------------------------------ autoencoder

  def encode(self, frames_BxHxWx3: jax.Array) -> jax.Array:
    """Pre-quantization latent z [B, H/p, W/p, k], float32.

    The patchify is a p x p stride-p conv, written as space_to_depth + a matmul.
    """
    check_frames(frames_BxHxWx3.shape, self.patch)
    dtype = self.w_patch_QxC[...].dtype
    x_BxHxWx3 = frames_BxHxWx3.astype(jnp.float32) / 127.5 - 1.0
    x_BxhxwxQ = space_to_depth(x_BxHxWx3, self.patch).astype(dtype)
    x_BxhxwxC = jnp.einsum('bhwq,qc->bhwc', x_BxhxwxQ, self.w_patch_QxC[...])
    for block in self.enc_blocks:
      x_BxhxwxC = block(x_BxhxwxC)
    return jnp.einsum('bhwc,ck->bhwk', self.enc_norm(x_BxhxwxC), self.w_latent_Cxk[...],
                      preferred_element_type=jnp.float32)

  def decode(self, zq_Bxhxwxk: jax.Array) -> jax.Array:
    """Image [B, h*p, w*p, 3], float32 in [0, 1]."""
    dtype = self.w_unlatent_kxC[...].dtype
    x_BxhxwxC = jnp.einsum('bhwk,kc->bhwc', zq_Bxhxwxk.astype(dtype), self.w_unlatent_kxC[...])
    for block in self.dec_blocks:
      x_BxhxwxC = block(x_BxhxwxC)
    x_BxhxwxQ = jnp.einsum('bhwc,cq->bhwq', self.dec_norm(x_BxhxwxC), self.w_unpatch_CxQ[...],
                           preferred_element_type=jnp.float32)
    return jax.nn.sigmoid(depth_to_space(x_BxhxwxQ, self.patch))

  # ------------------------------------------------------------------ quantizer

  def bounded(self, z_Bxhxwxk: jax.Array) -> jax.Array:
    """The latent the quantizer rounds: z itself (LFQ) or tanh(z) in [-1, 1] (FSQ)."""
    z = z_Bxhxwxk.astype(jnp.float32)
    return z if self.quantizer == 'lfq' else jnp.tanh(z)

  def quantize(self, z_Bxhxwxk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(zq, codes); zq has the value of codes_to_latent(codes), the gradient of bounded(z)."""
    zb_Bxhxwxk = self.bounded(z_Bxhxwxk)
    digits_Bxhxwxk = self.digits(zb_Bxhxwxk)
    value_Bxhxwxk = self.level_values()[digits_Bxhxwxk]
    zq_Bxhxwxk = value_Bxhxwxk + (zb_Bxhxwxk - jax.lax.stop_gradient(zb_Bxhxwxk))
    return zq_Bxhxwxk, self.digits_to_codes(digits_Bxhxwxk)

  def digits(self, zb_xk: jax.Array) -> jax.Array:
    """Level index per channel, int32 in [0, levels): sign bit (LFQ), nearest level (FSQ)."""
    if self.quantizer == 'lfq':
      return (zb_xk > 0).astype(jnp.int32)
    top = self.levels - 1
    return jnp.clip(jnp.round((zb_xk + 1.0) * (top / 2)), 0, top).astype(jnp.int32)

  def level_values(self) -> jax.Array:
    """Latent value of each level [levels]: (-1, 1) for LFQ, (-1, -1/3, 1/3, 1) for FSQ."""
    top = self.levels - 1
    return (2.0 * jnp.arange(self.levels, dtype=jnp.float32) - top) / top

  def digits_to_codes(self, digits_xk: jax.Array) -> jax.Array:
    """code = sum_i digit_i * levels**i (for LFQ: sum_i bit_i << i)."""
    place_k = self.levels ** jnp.arange(self.latent_channels, dtype=jnp.int32)
    return jnp.sum(digits_xk * place_k, axis=-1).astype(jnp.int32)

  def codes_to_digits(self, codes_x: jax.Array) -> jax.Array:
    shift_k = int(math.log2(self.levels)) * jnp.arange(self.latent_channels, dtype=jnp.int32)
    return (codes_x.astype(jnp.int32)[..., None] >> shift_k) & (self.levels - 1)

  def codes_to_latent(self, codes_Bxhxw: jax.Array) -> jax.Array:
    """Quantized latent [..., k], float32."""
    return self.level_values()[self.codes_to_digits(codes_Bxhxw)]

  def codebook(self) -> jax.Array:
    """Latent of every code [vocab, k], float32."""
    return self.codes_to_latent(jnp.arange(self.vocab, dtype=jnp.int32))

  def expected_latent(self, probs_xV: jax.Array) -> jax.Array:
    """sum_c probs[..., c] * codebook[c], exactly, without building the codebook.

    A code's latent is separable per channel, so E[zq_i] = sum_l P(digit_i = l) * value_l:
    reshape V into k axes of `levels` (most significant digit first) and take each
    channel's marginal. Linear in probs (need not be normalised); float32.
    """
    lead, n = probs_xV.shape[:-1], self.latent_channels
    p = probs_xV.astype(jnp.float32).reshape(lead + (self.levels,) * n)
    axes = tuple(range(len(lead), len(lead) + n))
    marginals = [jnp.sum(p, axis=tuple(a for a in axes if a != axes[n - 1 - i]))
                 for i in range(n)]
    return jnp.stack(marginals, axis=-2) @ self.level_values()

  # ------------------------------------------------------------------ tokens

  def tokenize(self, frames_BxHxWx3: jax.Array) -> jax.Array:
    """Codes [B, H/p, W/p], int32, no gradient."""
    _, codes_Bxhxw = self.quantize(self.encode(frames_BxHxWx3))
    return jax.lax.stop_gradient(codes_Bxhxw)

  def detokenize(self, codes_Bxhxw: jax.Array) -> jax.Array:
    return self.decode(self.codes_to_latent(codes_Bxhxw))

  # ------------------------------------------------------------------ training

  def loss(self, frames_BxHxWx3: jax.Array) -> tuple[jax.Array, dict]:
    """recon + commit_weight * commit + entropy_weight * entropy (LFQ only).

    recon is per code: squared error summed over the code's p*p*3 values in [0, 1]
    (= mse * p*p*3), so the commit and entropy weights act against the error of a
    whole block; with plain pixel-mean mse the commitment term dominates and
    strictly local codes collapse to a handful.
    """
    z_Bxhxwxk = self.encode(frames_BxHxWx3)
    zq_Bxhxwxk, codes_Bxhxw = self.quantize(z_Bxhxwxk)
    image_BxHxWx3 = self.decode(zq_Bxhxwxk)
    target_BxHxWx3 = frames_BxHxWx3.astype(jnp.float32) / 255.0
    mse = jnp.mean(jnp.square(image_BxHxWx3 - target_BxHxWx3))
    recon = mse * (self.patch * self.patch * 3)
    zb_Bxhxwxk = self.bounded(z_Bxhxwxk)
    commit = jnp.mean(jnp.square(zb_Bxhxwxk - jax.lax.stop_gradient(zq_Bxhxwxk)))
    aux = self.entropy_terms(z_Bxhxwxk)
    total = recon + self.commit_weight * commit + self.entropy_weight * aux['entropy']
    metrics = dict(loss=total, recon=recon, recon_mse=mse, commit=commit,
                   psnr=jnp.mean(psnr(image_BxHxWx3, target_BxHxWx3)),
                   **aux, **self.usage(codes_Bxhxw))
    return total, metrics

  def entropy_terms(self, z_Bxhxwxk: jax.Array) -> dict:
    """LFQ, factorised per bit (MAGVIT-v2): mean sample entropy - entropy of the mean.

    Both in nats, averaged over bits; zero for FSQ.
    """
    if self.quantizer != 'lfq':
      zero = jnp.zeros((), jnp.float32)
      return dict(entropy=zero, sample_entropy=zero, batch_entropy=zero)
    z_Nxk = z_Bxhxwxk.astype(jnp.float32).reshape(-1, self.latent_channels)
    p_Nxk = jax.nn.sigmoid(4.0 * ENTROPY_INV_TEMPERATURE * z_Nxk)
    sample = jnp.mean(bit_entropy(p_Nxk))
    batch = jnp.mean(bit_entropy(jnp.mean(p_Nxk, axis=0)))
    return dict(entropy=sample - batch, sample_entropy=sample, batch_entropy=batch)

  def usage(self, codes_Bxhxw: jax.Array) -> dict:
    """code_perplexity: exp(entropy) of the batch's code histogram;
    channel_usage: mean over channels of the level-histogram entropy / log(levels), in [0, 1]."""
    codes_N = codes_Bxhxw.reshape(-1)
    code_entropy = histogram_entropy(codes_N)
    onehot_NxkxL = jax.nn.one_hot(self.codes_to_digits(codes_N), self.levels)
    freq_kxL = jnp.mean(onehot_NxkxL, axis=0)
    plogp_kxL = jnp.where(freq_kxL > 0, freq_kxL * jnp.log(jnp.maximum(freq_kxL, 1e-30)), 0.0)
    level_entropy_k = -jnp.sum(plogp_kxL, axis=-1)
    return dict(code_perplexity=jnp.exp(code_entropy),
                channel_usage=jnp.mean(level_entropy_k) / math.log(self.levels))


def check_config(c):
  """A ConfigError (one line, the funnel's exit 2) for a tokenizer config that cannot build."""
  if c.quantizer not in LEVELS:
    raise ConfigError(f'tokenizer quantizer={c.quantizer!r}; expected one of {sorted(LEVELS)}')
  if not 1 <= c.bits <= 30:
    raise ConfigError(f'tokenizer bits={c.bits}; expected 1..30 (codes are int32)')
  if c.quantizer == 'fsq' and c.bits % 2:
    raise ConfigError(f'tokenizer bits={c.bits} with fsq (4 levels = 2 bits per channel); '
                      'expected an even number of bits')
  if c.kernel < 1 or c.kernel % 2 == 0:
    raise ConfigError(f'tokenizer kernel={c.kernel}; expected an odd size '
                      '(1 = strictly local, 3 = neighbours too)')


def check_frames(shape: tuple, patch: int):
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'tokenizer frames of shape {shape}; expected [B, H, W, 3]')
  if shape[1] % patch or shape[2] % patch:
    raise ValueError(f'tokenizer frames of shape {shape}: H={shape[1]} and W={shape[2]} must '
                     f'be multiples of patch={patch}')
