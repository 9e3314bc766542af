"""The attention shapes of the models, shared by benchmarks/attention.py and
kernel_resources.py."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from brainscale.nn.attention import Mask


@dataclasses.dataclass(frozen=True)
class Shape:
  """One attention call: B x T queries over B x S keys, N query and K key/value heads."""
  b: int
  t: int
  s: int
  n: int
  k: int
  h: int
  mask: str          # causal | local (0.5 s window over 30 Hz times) | padded (10% keys invalid)


SHAPES = {
    # CWM 80B: d 8192 = 64 heads x 128, causal over ~10k pointer + content tokens.
    'cwm_8k': Shape(1, 8192, 8192, 64, 64, 128, 'causal'),
    'cwm_10k': Shape(1, 10240, 10240, 64, 64, 128, 'causal'),
    # CWM 1B (cwm_1b_1gpu): d 1280 = 20 heads x 64.
    'cwm_1b_10k': Shape(1, 10240, 10240, 20, 20, 64, 'causal'),
    # Enigma 1B, 8 windows per GPU: the tower over 480 latent/video/behaviour tokens
    # (local layers: a 0.5 s window; global layers: all valid tokens), the latents
    # reading 11264 neuron tokens, and 12288 neuron queries decoding from the tower.
    'enigma_local': Shape(8, 480, 480, 24, 24, 64, 'local'),
    'enigma_global': Shape(8, 480, 480, 24, 24, 64, 'padded'),
    'enigma_read': Shape(8, 48, 11264, 24, 24, 64, 'padded'),
    'enigma_decode': Shape(8, 12288, 480, 24, 24, 64, 'padded'),
    # Small, for CPU: does every backend run.
    'smoke': Shape(1, 256, 256, 4, 2, 64, 'causal'),
    'smoke_local': Shape(2, 192, 192, 4, 4, 64, 'local'),
}
GPU_SHAPES = ['cwm_8k', 'cwm_10k', 'cwm_1b_10k', 'enigma_local', 'enigma_global', 'enigma_read',
              'enigma_decode']


def make_mask(shape: Shape, rng: np.random.Generator) -> Mask:
  if shape.mask == 'causal':
    return Mask(causal=True)
  if shape.mask == 'local':   # token times at 30 Hz, several tokens per time step
    times = np.sort(rng.integers(0, 60, (shape.b, shape.t)), axis=1) / 30.0
    times = jnp.asarray(times, jnp.float32)
    return Mask(window=0.5, q_pos_BxT=times, kv_pos_BxS=times)
  valid = rng.random((shape.b, shape.s)) < 0.9
  return Mask(kv_valid_BxS=jnp.asarray(valid))


def visible_pairs(shape: Shape, mask: Mask) -> float:
  """Query-key pairs the mask lets through (what the FLOPs are counted over)."""
  if shape.mask == 'causal':
    return shape.b * shape.t * (shape.t + 1) / 2
  return float(np.asarray(mask.dense(shape.b, shape.t, shape.s)).sum())
